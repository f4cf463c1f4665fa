"""Library code behind the Prefect tasks: specs, errors, the artifact store, targets, models, devices.

Nothing here imports Prefect; ``tasks/`` wraps these functions as Prefect tasks and ``flows/`` wires them.
"""
