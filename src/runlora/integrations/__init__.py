"""runlora inside other libraries: PEFT (``integrations.peft``, the chassis of every model)."""
