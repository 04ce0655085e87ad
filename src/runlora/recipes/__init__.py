"""Ready-made jobs built on the library: a LoRA fine-tune on a small built-in task
(``finetune``) and its data (``data``)."""
