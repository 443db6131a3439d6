"""Human labels: the query files, the annotations read back, the provenance log, Label Studio
and the label-import transaction."""
