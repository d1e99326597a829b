"""The trained model served: the MLflow pyfunc (pyfunc.py), built by the model-from-code file
pyfunc_model.py, saved or logged as a model folder (logged_model.py), and the bundle a
command names (resolve.py).

A model logged by an earlier version carries its own copy of that code file, which runs
``from flows.serving import HierLocPyfunc`` when MLflow loads the model: the name stays
importable here, so the registry's earlier versions keep loading and serving.
"""

from flows.serving.pyfunc import HierLocPyfunc

__all__ = ["HierLocPyfunc"]
