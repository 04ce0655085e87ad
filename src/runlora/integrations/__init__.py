"""runlora inside other libraries: PEFT (``peft``, the chassis of every model) and distributed
training (``distributed``: plan sync across ranks, gathered adapter checkpoints)."""
