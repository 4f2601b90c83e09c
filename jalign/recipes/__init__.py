"""One file per job a user runs, on the shared builders (``build``, ``rollouts``, ``reward``).

Recipes import the libraries below them and never each other, except ``build``, ``rollouts``,
``reward`` and ``critic``, which other recipes build on.
"""
