"""The machine's side of cnn-train: its local servers and what runs beside them.

``services`` (the Prefect and MLflow servers, their ports and state), ``launcher`` (``cnn-train up`` and
``down``), ``serve`` (the serve process of the deployments), ``worker`` (worker mode: the work pool and
``prefect.yaml``), ``doctor`` (health checks), ``auth`` (the shared servers' credentials), ``addresses``
(what other machines call this one by), ``detached`` (pid and log files of a detached process),
``temporary_server`` and ``prefect_database`` (the temporary Prefect server of a command run without
servers, and the migrated schema new Prefect databases start from). Nothing here is imported on
``import cnn_train.flows.ops``: each command imports the module it needs.
"""
