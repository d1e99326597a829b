"""The MLflow *model from code* for hierloc's pyfunc (flows.serving.logged_model.save_pyfunc logs this file).

MLflow runs this file to build the model, so a logged model holds no pickled object: its
code is this file, its settings are plain values in MLmodel, its artifact is the bundle
folder (plain files: JSON, Parquet, a weights-only model.pt).
"""

from mlflow.models import set_model

from flows.serving.pyfunc import HierLocPyfunc

set_model(HierLocPyfunc())
