from kedro.pipeline import Node, Pipeline

from vlm_pipeline.pipelines.adapter.nodes import extract_adapter, merge_adapter, pass_through_full_model


def stage(nodes: list[Node]) -> Pipeline:
    """The nodes under the stage namespace ``adapter`` (inside the variant's), dataset names unchanged."""
    return Pipeline(nodes, namespace="adapter", prefix_datasets_with_namespace=False)


def create_pipeline(variant: str) -> Pipeline:
    """LoRA variants extract and merge an adapter; ``full_ft`` passes the trained model through."""
    if variant == "full_ft":
        pass_through = Node(
            pass_through_full_model,
            inputs=["run_context", "trained_model", "merged_model_staging"],
            outputs=["merged_model", "merge_check"],
            name="pass_through_full_model",
        )
        return Pipeline(stage([pass_through]), tags="adapter", namespace=variant, inputs={"run_context"})
    nodes = [
        Node(
            extract_adapter,
            inputs=["trained_model", "adapter_staging"],
            outputs=["adapter", "adapter_summary"],
            name="extract_adapter",
        ),
        Node(
            merge_adapter,
            inputs=[
                "run_context",
                "adapter",
                "trained_model",
                "test_tokenized@arrow",
                "params:adapter",
                "merged_model_staging",
            ],
            outputs=["merged_model", "merge_check"],
            name="merge_adapter",
        ),
    ]
    return Pipeline(
        stage(nodes),
        tags="adapter",
        namespace=variant,
        inputs={"run_context", "test_tokenized@arrow"},
        parameters={"params:adapter"},
    )
