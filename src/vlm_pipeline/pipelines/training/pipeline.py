from kedro.pipeline import Node, Pipeline

from vlm_pipeline.pipelines.training.nodes import plan_training, train_model, training_curves


def create_pipeline(variant: str) -> Pipeline:
    """The training stage for one variant; ``params:method`` and the outputs are namespaced by it."""
    template = Pipeline(
        [
            Node(
                plan_training,
                inputs=[
                    "train_tokenized@arrow",
                    "base_model",
                    "params:preprocessing",
                    "params:model",
                    "params:sft",
                    "params:method",
                    "params:plan",
                    "params:trust_remote_code",
                ],
                outputs="training_plan",
                name="plan_training",
            ),
            Node(
                train_model,
                inputs=[
                    "train_tokenized@path",
                    "validation_tokenized@path",
                    "base_model",
                    "params:raw_data",
                    "params:preprocessing",
                    "params:model",
                    "params:sft",
                    "params:method",
                    "training_plan",
                    "params:trust_remote_code",
                ],
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
        inputs={"train_tokenized@arrow", "train_tokenized@path", "validation_tokenized@path", "base_model"},
        parameters={
            "params:raw_data",
            "params:preprocessing",
            "params:model",
            "params:sft",
            "params:plan",
            "params:trust_remote_code",
        },
    )
