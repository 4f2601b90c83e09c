"""PyTriton servers for the jobs beside the actor, and their clients.

``python -m jalign.serve --config=configs/<name>.py`` starts the servers a config names: for a ``ppo``
config, the critic and reward model (NeMo-Aligner's critic server, ``jalign.serve.critic``). The
actor reaches them through clients with the interface of the in-process objects.
"""
