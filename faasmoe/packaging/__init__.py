"""Packaging expert functions for FaaS platforms (Knative, OpenFaaS, tinyFaaS, a plain HTTP server)."""
