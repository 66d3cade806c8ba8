"""Registers each Courtside ECS task with the NLB's QUIC target group under its QUIC server ID.

An ECS service cannot give a target its ``QuicServerId``, so this function does it: EventBridge
sends it every "ECS Task State Change" of the service; a task that is RUNNING is registered
(its ENI's private IP, the WebTransport port, and the ID), a task on its way to STOPPED is
deregistered (so the NLB drains it while Courtside drains its sessions).

The ID is the first 8 bytes of SHA-256 over the task ARN, in lowercase hex after ``0x``: what
``courtside serve --quic-server-id ecs-task`` derives from its own task metadata, so the target
and the connection IDs agree without either telling the other.
"""

import hashlib
import json
import logging
import os

logger = logging.getLogger()
logger.setLevel(logging.INFO)


def server_id(task_arn):
    """The QUIC server ID of a task: ``0x`` and the first 16 hex digits of SHA-256(ARN)."""
    return "0x" + hashlib.sha256(task_arn.encode("utf-8")).hexdigest()[:16]


def task_ip(detail):
    """The task's private IPv4 address (awsvpc network mode: its ENI attachment)."""
    for attachment in detail.get("attachments", []):
        if attachment.get("type") != "eni":
            continue
        for item in attachment.get("details", []):
            if item.get("name") == "privateIPv4Address" and item.get("value"):
                return item["value"]
    return None


def plan(event, port, cluster_arn=None, group=None):
    """What to do for one event: ``("register" | "deregister", target)`` or ``None``.

    ``target`` is the ``Targets`` item of the ELBv2 call. Events of another cluster or service
    group, tasks without an address yet, and states in between are ignored.
    """
    if event.get("detail-type") != "ECS Task State Change":
        return None
    detail = event.get("detail", {})
    if cluster_arn and detail.get("clusterArn") != cluster_arn:
        return None
    if group and detail.get("group") != group:
        return None
    task_arn = detail.get("taskArn")
    ip = task_ip(detail)
    if not task_arn or not ip:
        return None
    last, desired = detail.get("lastStatus"), detail.get("desiredStatus")
    if desired == "STOPPED" or last in ("DEACTIVATING", "STOPPING", "DEPROVISIONING", "STOPPED"):
        return ("deregister", {"Id": ip, "Port": port})
    if last == "RUNNING" and desired == "RUNNING":
        return ("register", {"Id": ip, "Port": port, "QuicServerId": server_id(task_arn)})
    return None


def apply(elbv2, target_group_arn, action):
    """Carries out a plan on the ELBv2 client. A registration that collides with a stale target
    of the same address (a server ID cannot be changed) deregisters it and registers again."""
    if action is None:
        return "ignored"
    kind, target = action
    if kind == "deregister":
        elbv2.deregister_targets(TargetGroupArn=target_group_arn, Targets=[target])
        return "deregistered"
    try:
        elbv2.register_targets(TargetGroupArn=target_group_arn, Targets=[target])
    except elbv2.exceptions.ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if code not in ("ValidationError", "InvalidTarget"):
            raise
        stale = {"Id": target["Id"], "Port": target["Port"]}
        elbv2.deregister_targets(TargetGroupArn=target_group_arn, Targets=[stale])
        elbv2.register_targets(TargetGroupArn=target_group_arn, Targets=[target])
        return "re-registered"
    return "registered"


def lambda_handler(event, context, elbv2=None):
    """The Lambda entry point. Configuration: TARGET_GROUP_ARN, PORT (default 4433),
    CLUSTER_ARN and SERVICE_GROUP (``service:NAME``) to filter events."""
    if elbv2 is None:
        import boto3  # the Lambda runtime has it; the tests pass a stubbed client

        elbv2 = boto3.client("elbv2")
    action = plan(
        event,
        int(os.environ.get("PORT", "4433")),
        os.environ.get("CLUSTER_ARN") or None,
        os.environ.get("SERVICE_GROUP") or None,
    )
    result = apply(elbv2, os.environ["TARGET_GROUP_ARN"], action)
    logger.info(json.dumps({"result": result, "action": action, "task": event.get("detail", {}).get("taskArn")}))
    return {"result": result}
