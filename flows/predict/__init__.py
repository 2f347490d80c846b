"""From a trained model to predictions on image files.

- :mod:`.images`: files and folders to 28x28 pictures made the way Fashion-MNIST's were.
- :mod:`.models`: the model to use (named, or the default), loaded through MLflow's pyfunc API and checked.
- :mod:`.predict`: probabilities per image, top-k in words, the predictions table and its summary.
- :mod:`.figure`: a few classified images as the model saw them.
"""

from cnn_train.flows.predict.images import (
    Collected,
    ImageReadError,
    ModelInput,
    NOTHING_THERE,
    collect_images,
    load_model_input,
    not_taken,
    to_model_input,
    write_model_inputs,
)
from cnn_train.flows.predict.models import LoadedModel, UnusableModelError, check_signature, choose_model, load_model
from cnn_train.flows.predict.predict import (
    LOW_CONFIDENCE,
    Failure,
    Predictions,
    Summary,
    classify,
    counted,
    input_file_names,
    predictions_table,
    summarize,
    top_k,
    top_k_line,
    write_outputs,
)

__all__ = [
    "LOW_CONFIDENCE",
    "Collected",
    "Failure",
    "ImageReadError",
    "LoadedModel",
    "ModelInput",
    "Predictions",
    "Summary",
    "UnusableModelError",
    "check_signature",
    "choose_model",
    "classify",
    "counted",
    "NOTHING_THERE",
    "collect_images",
    "input_file_names",
    "load_model",
    "load_model_input",
    "not_taken",
    "predictions_table",
    "summarize",
    "to_model_input",
    "top_k",
    "top_k_line",
    "write_model_inputs",
    "write_outputs",
]
