from kedro.pipeline import Node, Pipeline

from vlm_pipeline.pipelines.data_validation.nodes import enforce_reject_budget, validate_raw_data


def create_pipeline(**kwargs) -> Pipeline:
    # One node for both files: the test split may be held out of train.jsonl, and test records are checked
    # against train for leakage.
    validate = Node(
        validate_raw_data,
        inputs=[
            "raw_train_lines",
            "raw_test_lines",
            "raw_images",
            "decoded_images",
            "project_folder",
            "params:data_validation",
        ],
        outputs=[
            "train_candidates",
            "test_candidates",
            "train_quarantine",
            "test_quarantine",
            "train_validation_report",
            "test_validation_report",
        ],
        name="validate_raw_data",
    )
    budget = Node(
        enforce_reject_budget,
        inputs=[
            "train_candidates",
            "test_candidates",
            "train_validation_report",
            "test_validation_report",
            "raw_images",
            "project_folder",
            "params:data_validation",
        ],
        outputs=["train_records", "test_records", "validation_summary"],
        name="enforce_reject_budget",
    )
    # The stage namespace groups the nodes (Kedro-Viz draws it as one box); dataset names stay the catalog's.
    return Pipeline(
        [validate, budget], tags="data_validation", namespace="data_validation", prefix_datasets_with_namespace=False
    )
