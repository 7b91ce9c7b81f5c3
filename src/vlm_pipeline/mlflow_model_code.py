"""The model code MLflow logs with the merged model ("models from code"): MLflow runs this file when it logs the
model and again when ``mlflow.pyfunc.load_model`` loads it (from the copy in the logged model folder), and the
model is what it hands to ``mlflow.models.set_model``. Nothing is pickled. See :mod:`vlm_pipeline.mlflow_model`.
"""

import mlflow.models

from vlm_pipeline.mlflow_model import FineTunedModel

mlflow.models.set_model(FineTunedModel())
