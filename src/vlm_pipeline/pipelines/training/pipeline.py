from kedro.pipeline import Node, Pipeline

from vlm_pipeline.pipelines.training.nodes import train_model, training_curves


def create_pipeline(variant: str) -> Pipeline:
    """The training stage for one variant; ``params:method`` and the outputs are namespaced by it."""
    template = Pipeline(
        [
            Node(
                train_model,
                inputs=[
                    "train_tokenized@path", "validation_tokenized@path", "base_model", "params:raw_data",
                    "params:preprocessing", "params:sft", "params:method", "params:trust_remote_code",
                ],  # fmt: skip
                outputs=["trained_model", "training_history", "trainable_parameters"],
                name="train_model",
            ),
            Node(training_curves, inputs="training_history", outputs="training_curves", name="log_training_curves"),
        ],
        tags="training",
    )
    return Pipeline(
        template,
        namespace=variant,
        inputs={"train_tokenized@path", "validation_tokenized@path", "base_model"},
        parameters={"params:raw_data", "params:preprocessing", "params:sft", "params:trust_remote_code"},
    )
