"""``ray.job_submission``: submit jobs to a cluster's head over HTTP and follow them
(the client lives in the control plane, controlplane/job_client.py, which ``cairn job``
uses too)."""

from controlplane.job_client import DriverInfo, JobDetails, JobSubmissionClient, JobType
from controlplane.jobs import JobStatus

# Ray's JobInfo is the older shape of the same record: Cairn answers JobDetails for both
JobInfo = JobDetails

__all__ = ["DriverInfo", "JobDetails", "JobInfo", "JobStatus", "JobSubmissionClient", "JobType"]
