"""Text in and out: tokenizers, chat templates and sampling.

:mod:`.tokenizer` wraps an HF ``tokenizer.json`` (with streaming decode), :mod:`.chat_template`
renders a model's Jinja chat template, :mod:`.sampling` turns logits into the next token
(greedy, temperature, top-k/top-p, seeded). No MPI, no mesh, no weights. May import
:mod:`llm.modeling`;
nothing from :mod:`meshrt`.
"""
