"""The base every other part stands on: the prototype store and queues, crash safety, artifacts and
manifests, strings, errors, terminal output and runtime facts."""
