from kedro.pipeline import Node, Pipeline

from vlm_pipeline.pipelines.data_validation.nodes import enforce_reject_budget, validate_split


def create_pipeline(**kwargs) -> Pipeline:
    split_nodes = [
        Node(
            validate_split,
            inputs=[f"raw_{split}_lines", "raw_images", "params:data_validation"],
            outputs=[f"{split}_candidates", f"{split}_quarantine", f"{split}_validation_report"],
            name=f"validate_{split}",
        )
        for split in ("train", "test")
    ]
    budget = Node(
        enforce_reject_budget,
        inputs=[
            "train_candidates",
            "test_candidates",
            "train_validation_report",
            "test_validation_report",
            "raw_images",
            "params:data_validation",
        ],
        outputs=["train_records", "test_records", "validation_summary"],
        name="enforce_reject_budget",
    )
    return Pipeline([*split_nodes, budget], tags="data_validation")
