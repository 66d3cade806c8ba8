"""Tests of the registration function without AWS: the event logic directly, and the ELBv2 calls
through botocore's Stubber, which validates each request against the real service model (so a
misspelt parameter or a server ID of the wrong form fails here). Run: python3 -m unittest."""

import copy
import os
import unittest

import botocore.session
from botocore.exceptions import ClientError
from botocore.stub import Stubber

import handler

TG = "arn:aws:elasticloadbalancing:us-west-2:111122223333:targetgroup/courtside-quic/0123456789abcdef"
ARN = "arn:aws:ecs:us-west-2:111122223333:task/courtside/0123456789abcdef0123456789abcdef"
CLUSTER = "arn:aws:ecs:us-west-2:111122223333:cluster/courtside"

EVENT = {
    "version": "0",
    "detail-type": "ECS Task State Change",
    "source": "aws.ecs",
    "detail": {
        "clusterArn": CLUSTER,
        "group": "service:courtside",
        "taskArn": ARN,
        "lastStatus": "RUNNING",
        "desiredStatus": "RUNNING",
        "attachments": [
            {
                "type": "eni",
                "status": "ATTACHED",
                "details": [
                    {"name": "subnetId", "value": "subnet-0a"},
                    {"name": "privateIPv4Address", "value": "10.0.1.23"},
                ],
            }
        ],
    },
}


# The task of EVENT as the NLB target: registered with its ID, deregistered by address and port.
TARGET = {"Id": "10.0.1.23", "Port": 4433, "QuicServerId": "0x05cd5e4324e6ab56"}
ADDRESS = {"Id": "10.0.1.23", "Port": 4433}


def event(**detail):
    e = copy.deepcopy(EVENT)
    e["detail"].update(detail)
    return e


def client():
    return botocore.session.get_session().create_client(
        "elbv2", region_name="us-west-2", aws_access_key_id="x", aws_secret_access_key="x"
    )


class ServerIdTest(unittest.TestCase):
    def test_the_id_is_what_courtside_derives_from_the_same_arn(self):
        # The vector of deploy/README.md and src/quic_lb.rs's test.
        self.assertEqual(handler.server_id(ARN), "0x05cd5e4324e6ab56")

    def test_the_id_has_the_form_the_nlb_takes(self):
        sid = handler.server_id("arn:aws:ecs:eu-west-1:1:task/c/x")
        self.assertRegex(sid, r"^0x[0-9a-f]{16}$")


class PlanTest(unittest.TestCase):
    def test_a_running_task_is_registered_with_its_address_and_id(self):
        self.assertEqual(
            handler.plan(EVENT, 4433, CLUSTER, "service:courtside"),
            ("register", TARGET),
        )

    def test_a_stopping_task_is_deregistered_before_it_stops(self):
        for last, desired in [("RUNNING", "STOPPED"), ("DEACTIVATING", "STOPPED"), ("STOPPED", "STOPPED")]:
            self.assertEqual(
                handler.plan(event(lastStatus=last, desiredStatus=desired), 4433),
                ("deregister", ADDRESS),
            )

    def test_other_events_clusters_services_and_early_states_are_ignored(self):
        self.assertIsNone(handler.plan(event(lastStatus="PROVISIONING"), 4433))
        self.assertIsNone(handler.plan(event(lastStatus="PENDING"), 4433))
        self.assertIsNone(handler.plan(EVENT, 4433, cluster_arn="arn:other"))
        self.assertIsNone(handler.plan(EVENT, 4433, group="service:other"))
        self.assertIsNone(handler.plan(event(attachments=[]), 4433))
        self.assertIsNone(handler.plan(dict(EVENT, **{"detail-type": "ECS Service Action"}), 4433))


class ApplyTest(unittest.TestCase):
    def setUp(self):
        os.environ["TARGET_GROUP_ARN"] = TG
        os.environ["PORT"] = "4433"
        os.environ["CLUSTER_ARN"] = CLUSTER
        os.environ["SERVICE_GROUP"] = "service:courtside"

    def test_registration_is_a_valid_register_targets_call(self):
        elbv2 = client()
        with Stubber(elbv2) as stub:
            stub.add_response(
                "register_targets",
                {},
                {"TargetGroupArn": TG, "Targets": [TARGET]},
            )
            self.assertEqual(handler.lambda_handler(EVENT, None, elbv2=elbv2), {"result": "registered"})
            stub.assert_no_pending_responses()

    def test_deregistration_is_a_valid_deregister_targets_call(self):
        elbv2 = client()
        with Stubber(elbv2) as stub:
            stub.add_response(
                "deregister_targets",
                {},
                {"TargetGroupArn": TG, "Targets": [ADDRESS]},
            )
            result = handler.lambda_handler(event(desiredStatus="STOPPED"), None, elbv2=elbv2)
            self.assertEqual(result, {"result": "deregistered"})
            stub.assert_no_pending_responses()

    def test_a_stale_target_at_the_same_address_is_replaced(self):
        elbv2 = client()
        with Stubber(elbv2) as stub:
            stub.add_client_error("register_targets", "ValidationError", "server ID cannot be modified")
            stub.add_response("deregister_targets", {}, {"TargetGroupArn": TG, "Targets": [ADDRESS]})
            stub.add_response("register_targets", {}, {"TargetGroupArn": TG, "Targets": [TARGET]})
            self.assertEqual(handler.apply(elbv2, TG, ("register", TARGET)), "re-registered")
            stub.assert_no_pending_responses()

    def test_other_errors_are_raised_for_the_retry_of_eventbridge(self):
        elbv2 = client()
        with Stubber(elbv2) as stub:
            stub.add_client_error("register_targets", "TargetGroupNotFound", "gone")
            with self.assertRaises(ClientError):
                handler.apply(elbv2, TG, ("register", TARGET))

    def test_the_stubber_validates_requests_against_the_service_model(self):
        # The model's check is real: a request shape it does not know fails validation.
        elbv2 = client()
        with Stubber(elbv2) as stub:
            stub.add_response("register_targets", {}, {"TargetGroupArn": TG, "Targets": [{"Id": "10.0.1.23"}]})
            with self.assertRaises(Exception):
                elbv2.register_targets(TargetGroupArn=TG, Targets=[{"Id": "10.0.1.23", "QuicId": "x"}])


if __name__ == "__main__":
    unittest.main()
