"""Runner profiles and launchers (Prism/DirectRunner, Flink, Spark) and the local stack.

No business logic lives here: only how and where the pipelines run.
"""
