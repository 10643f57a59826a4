"""Training the demo model: a tiny Llama 4 trained on data every Python install has.

Nothing here runs at import. `python -m maverick_ray.train --help` lists the commands
(train, eval); the modules are: architecture (the demo config), data_* (corpus, chat tasks,
images), tokenizer_train, batches (mixture and packing), model (training wrapper around the
serving modules), loop (optimizer, schedule, progress), export (HF checkpoint), evaluate.
"""
