"""Beam transforms of the events pipeline, and the domain definitions they share.

Importing this package is cheap and does not import Beam: the ingress uses
``transforms.envelope`` without pulling the pipeline's dependencies in.
"""
