"""What the emitted module calls at run time: layout changes with the right backward,
input and output conversion, and ops run on local shards."""
