"""Training: ``launcher`` (the Kedro side: resolve config, run ``accelerate launch``) and ``trainer``
(the process side: a module runnable on its own that builds TRL's SFTTrainer and runs it)."""
