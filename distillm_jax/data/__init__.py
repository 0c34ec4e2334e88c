"""Tasks and data. Today: the offline ``demo`` task (``data.demo``) and fixed-shape batching with a
resumable order (``data.batching``). The hub/local tasks (dolly, samsum, iwslt2017, openwebtext) arrive
with the trainer (issue 5)."""
