"""Tasks and data: the paper's tasks as prompt/response pairs from local files or the hub
(``data.tasks``), the offline ``demo`` task (``data.demo``), and fixed-shape batching with a resumable
order (``data.batching``). Tokenising whole datasets per host and the LM (openwebtext) batches arrive
with the trainer (issue 5)."""
