"""``secagg demo``: hospital sites training one image classifier together over the service.

Modules: :mod:`.data` (data sets and the non-IID split), :mod:`.model` (a small CNN),
:mod:`.train` (local training, with Opacus DP-SGD when asked), :mod:`.site` (a site process),
:mod:`.run` (the orchestration, the plaintext baseline and the report). torch is imported only
inside these modules.
"""
