"""Kedro project settings."""

from kedro.config import OmegaConfigLoader
from omegaconf.resolvers import oc

from vlm_pipeline.hooks import BaseModelCheck, LibraryProgressBars, ParameterChecks
from vlm_pipeline.tracking import RunDetails

# ParameterChecks fails a bad run before anything starts, BaseModelCheck a run of a model stage without a model;
# RunDetails names and tags the MLflow run kedro-mlflow starts; LibraryProgressBars keeps datasets' and
# transformers' bars out of logs.
HOOKS = (ParameterChecks(), BaseModelCheck(), RunDetails(), LibraryProgressBars())

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    "config_patterns": {
        "parameters": ["parameters*", "parameters*/**", "**/parameters*"],
        "mlflow": ["mlflow*", "mlflow*/**"],
    },
    # A conf environment (--env) overrides single keys of a parameter group, not whole groups.
    "merge_strategy": {"parameters": "soft", "globals": "soft"},
    # MLflow's own convention: MLFLOW_TRACKING_URI may point at a server. Kedro only allows oc.env in
    # credentials by default, so it is registered here for mlflow.yml's tracking URI.
    "custom_resolvers": {"oc.env": oc.env},
}
