"""The ops: input checks, autocast rule, backend dispatch and autograd, one file per op."""
