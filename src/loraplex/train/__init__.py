"""loraplex.train: LoRA adapters trained with PEFT and the transformers Trainer.

``data`` (JSONL shapes, every bad line), ``encode`` (tokens and masked labels, chat template),
``loss`` (answer-only loss), ``memory`` (batch size / checkpointing from free memory),
``runtime`` (device, model, Trainer), ``trainer`` (one run -> adapter folder + manifest),
``manifest`` (``loraplex.json``), ``cli`` (``loraplex train``), ``demo`` (the demo adapters).
"""
