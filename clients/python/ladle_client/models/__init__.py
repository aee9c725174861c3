"""Contains all the data models used in inputs/outputs"""

from .analysis_request import AnalysisRequest
from .api_error import ApiError
from .delivery_record import DeliveryRecord
from .delivery_state import DeliveryState
from .error_code import ErrorCode
from .error_view import ErrorView
from .evaluator_spec import EvaluatorSpec
from .job_state import JobState
from .job_view import JobView
from .list_view import ListView
from .merge_request import MergeRequest
from .merge_request_parameters import MergeRequestParameters
from .model_ref_object import ModelRefObject
from .model_spec import ModelSpec
from .model_spec_parameters import ModelSpecParameters
from .notify_spec import NotifySpec
from .notify_view import NotifyView
from .output_spec import OutputSpec
from .phase import Phase
from .progress_snapshot import ProgressSnapshot
from .ready_view import ReadyView
from .select_type_0 import SelectType0
from .select_type_1 import SelectType1
from .select_type_2 import SelectType2
from .slice_source_spec import SliceSourceSpec
from .slice_source_spec_parameters import SliceSourceSpecParameters
from .slice_spec import SliceSpec
from .slice_spec_parameters import SliceSpecParameters
from .sweep_spec import SweepSpec
from .trajectory_spec import TrajectorySpec
from .webhook_event import WebhookEvent

__all__ = (
    "AnalysisRequest",
    "ApiError",
    "DeliveryRecord",
    "DeliveryState",
    "ErrorCode",
    "ErrorView",
    "EvaluatorSpec",
    "JobState",
    "JobView",
    "ListView",
    "MergeRequest",
    "MergeRequestParameters",
    "ModelRefObject",
    "ModelSpec",
    "ModelSpecParameters",
    "NotifySpec",
    "NotifyView",
    "OutputSpec",
    "Phase",
    "ProgressSnapshot",
    "ReadyView",
    "SelectType0",
    "SelectType1",
    "SelectType2",
    "SliceSourceSpec",
    "SliceSourceSpecParameters",
    "SliceSpec",
    "SliceSpecParameters",
    "SweepSpec",
    "TrajectorySpec",
    "WebhookEvent",
)
