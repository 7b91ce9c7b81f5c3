from kedro.pipeline import Node, Pipeline

from vlm_pipeline.pipelines.training.nodes import plan_training, train_model, write_run_config


def create_pipeline(variant: str) -> Pipeline:
    """The training stage for one variant (nodes ``<variant>.training.*``); ``params:method`` and the outputs are
    namespaced by the variant only."""
    template = Pipeline(
        [
            Node(
                plan_training,
                inputs=[
                    "train_tokenized@arrow",
                    "run_context",
                    "params:preprocessing",
                    "params:sft",
                    "params:method",
                    "params:plan",
                ],
                outputs="training_plan",
                name="plan_training",
            ),
            Node(
                write_run_config,
                inputs=[
                    "run_context",
                    "train_tokenized@path",
                    "validation_tokenized@path",
                    "params:preprocessing",
                    "params:sft",
                    "params:method",
                    "checkpoints",
                    "trained_model_staging",
                ],
                outputs="run_config@json",
                name="write_run_config",
            ),
            Node(
                train_model,
                inputs=["run_config@path", "training_plan"],
                outputs=["trained_model", "training_history", "trainable_parameters"],
                name="train_model",
            ),
        ],
        tags="training",
        namespace="training",
        prefix_datasets_with_namespace=False,
    )
    return Pipeline(
        template,
        namespace=variant,
        inputs={"train_tokenized@arrow", "train_tokenized@path", "validation_tokenized@path", "run_context"},
        parameters={"params:preprocessing", "params:sft", "params:plan"},
    )
