"""The versioned adapter registry: content-addressed blobs, immutable versions, movable tags."""

from adapterhub.registry.index import VersionInfo
from adapterhub.registry.refs import Ref, parse_ref
from adapterhub.registry.registry import GcPlan, PushResult, Registry, Resolved, VerifyReport, default_path

__all__ = ["GcPlan", "PushResult", "Ref", "Registry", "Resolved", "VerifyReport", "VersionInfo", "default_path",
           "parse_ref"]
