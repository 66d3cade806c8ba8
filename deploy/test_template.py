"""The stack's wiring read back from courtside.yaml, without an AWS account: the scaling policies,
alarms and scheduled actions against the original design's table (deploy/README.md, "Scaling"),
the cost options, the token and history parameters, and the runbook's parameter table.

The template is resolved for a set of parameters (their defaults, or a test's) by a small
evaluator of the intrinsic functions it uses (Ref, If, Sub, Equals, Not, Join); what refers to a
resource stays as written. Needs PyYAML only: `python3 -m unittest test_template` in deploy/
(deploy/check.sh and tests/run.sh run it).
"""

import pathlib
import re
import unittest

import yaml

HERE = pathlib.Path(__file__).resolve().parent
NO_VALUE = object()

# The original design's scaling table (ADR-022 and issue 24), with Courtside's connection target.
DESIGN = {
    "min_tasks": 3,
    "max_tasks": 20,
    "target_tracking": {  # metric -> target; each scales out after 60 s
        "ECSServiceAverageCPUUtilization": 70,
        "ECSServiceAverageMemoryUtilization": 80,
        "Connections": 10000,  # bench/README.md, "Sizing a Saturday" (not Socket.IO's 500)
    },
    "scale_out_cooldown_s": 60,
    "step_out": {  # metric -> (threshold, tasks added)
        "DeliveryLatencyP99": (1000, 2),
        "Outbox": (1000, 2),
    },
    "scale_in_tasks": 1,
    "scale_in_after_scale_out_s": 300,
}


class _Loader(yaml.SafeLoader):
    pass


def _tagged(loader, suffix, node):
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    if suffix == "Ref":
        return {"Ref": value}
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {"Fn::" + suffix: value}


_Loader.add_multi_constructor("!", _tagged)


def load_template():
    with open(HERE / "courtside.yaml") as f:
        return yaml.load(f, Loader=_Loader)


class Stack:
    """The template resolved for `overrides` on top of the parameters' defaults."""

    def __init__(self, **overrides):
        self.template = load_template()
        self.params = {}
        for name, spec in self.template["Parameters"].items():
            value = overrides.get(name, spec.get("Default"))
            if spec["Type"] == "Number" and value is not None:
                value = int(value)
            if spec["Type"] == "CommaDelimitedList" and isinstance(value, str):
                value = [v for v in value.split(",")] if value else [""]
            self.params[name] = value
        unknown = set(overrides) - set(self.params)
        assert not unknown, f"no such parameters: {unknown}"
        self.conditions = {}
        for name, expr in self.template["Conditions"].items():
            self.conditions[name] = bool(self.resolve(expr))

    def resolve(self, node):
        if isinstance(node, list):
            items = [self.resolve(n) for n in node]
            return [i for i in items if i is not NO_VALUE]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            (key, arg), = node.items()
            if key == "Ref":
                if arg == "AWS::NoValue":
                    return NO_VALUE
                if arg in self.params:
                    return self.params[arg]
                return node
            if key == "Fn::If":
                name, then, otherwise = arg
                return self.resolve(then if self.conditions[name] else otherwise)
            if key == "Fn::Equals":
                a, b = (self.resolve(x) for x in arg)
                return str(a) == str(b)
            if key == "Fn::Not":
                return not self.resolve(arg[0])
            if key == "Fn::Join":
                sep, items = arg
                items = self.resolve(items)
                if all(isinstance(i, str) for i in items):
                    return sep.join(items)
                return {key: [sep, items]}
            if key == "Fn::Sub":
                text = arg if isinstance(arg, str) else arg[0]

                def substitute(m):
                    name = m.group(1)
                    value = self.params.get(name)
                    return m.group(0) if value is None or isinstance(value, list) else str(value)

                return re.sub(r"\$\{([A-Za-z0-9:]+)\}", substitute, text)
        out = {}
        for k, v in node.items():
            v = self.resolve(v)
            if v is not NO_VALUE:
                out[k] = v
        return out

    def resource(self, name):
        return self.resolve(self.template["Resources"][name])

    def of_type(self, kind):
        return {
            name: self.resource(name)
            for name, r in self.template["Resources"].items()
            if r["Type"] == kind and ("Condition" not in r or self.conditions[r["Condition"]])
        }


def ref(name):
    return {"Ref": name}


def metric_name(alarm):
    return alarm["Properties"].get("MetricName")


class ScalingWiring(unittest.TestCase):
    def setUp(self):
        self.stack = Stack()
        self.policies = self.stack.of_type("AWS::ApplicationAutoScaling::ScalingPolicy")
        self.alarms = self.stack.of_type("AWS::CloudWatch::Alarm")

    def alarms_acting_on(self, policy):
        return {n: a for n, a in self.alarms.items() if ref(policy) in a["Properties"].get("AlarmActions", [])}

    def test_the_range_is_the_designs(self):
        target = self.stack.resource("ScalableTarget")["Properties"]
        self.assertEqual((target["MinCapacity"], target["MaxCapacity"]), (DESIGN["min_tasks"], DESIGN["max_tasks"]))

    def test_target_tracking_scales_out_on_cpu_memory_and_connections_and_never_in(self):
        seen = {}
        for name, policy in self.policies.items():
            props = policy["Properties"]
            if props["PolicyType"] != "TargetTrackingScaling":
                continue
            config = props["TargetTrackingScalingPolicyConfiguration"]
            metric = config.get("PredefinedMetricSpecification", {}).get("PredefinedMetricType") or config[
                "CustomizedMetricSpecification"
            ]["MetricName"]
            seen[metric] = config["TargetValue"]
            self.assertEqual(config["ScaleOutCooldown"], DESIGN["scale_out_cooldown_s"], name)
            # Its own scale-in could remove several tasks at once; ScaleInOneTask does it.
            self.assertIs(config.get("DisableScaleIn"), True, name)
            self.assertEqual(props["ScalingTargetId"], ref("ScalableTarget"), name)
        self.assertEqual(seen, DESIGN["target_tracking"])

    def test_each_step_rule_adds_two_tasks_from_its_alarm(self):
        found = {}
        for name, policy in self.policies.items():
            props = policy["Properties"]
            if props["PolicyType"] != "StepScaling":
                continue
            config = props["StepScalingPolicyConfiguration"]
            steps = config["StepAdjustments"]
            if steps[0]["ScalingAdjustment"] < 0:
                continue
            self.assertEqual(config["AdjustmentType"], "ChangeInCapacity", name)
            self.assertEqual(len(steps), 1, name)
            self.assertEqual(steps[0]["MetricIntervalLowerBound"], 0, name)
            alarms = self.alarms_acting_on(name)
            self.assertEqual(len(alarms), 1, f"{name} has one alarm: {sorted(alarms)}")
            (alarm,) = alarms.values()
            a = alarm["Properties"]
            self.assertEqual(a["ComparisonOperator"], "GreaterThanThreshold", name)
            self.assertEqual(a["Statistic"], "Maximum", f"{name}: the worst task counts")
            self.assertEqual(a["Dimensions"], [{"Name": "Service", "Value": "courtside"}, {"Name": "Environment", "Value": "production"}])
            found[a["MetricName"]] = (a["Threshold"], steps[0]["ScalingAdjustment"])
        self.assertEqual(found, DESIGN["step_out"])

    def scale_in(self):
        ins = {
            n: p
            for n, p in self.policies.items()
            if p["Properties"]["PolicyType"] == "StepScaling"
            and p["Properties"]["StepScalingPolicyConfiguration"]["StepAdjustments"][0]["ScalingAdjustment"] < 0
        }
        self.assertEqual(len(ins), 1, f"one scale-in policy: {sorted(ins)}")
        (name, policy), = ins.items()
        alarms = self.alarms_acting_on(name)
        self.assertEqual(len(alarms), 1)
        (alarm,) = alarms.values()
        return policy["Properties"]["StepScalingPolicyConfiguration"], alarm["Properties"]

    def test_scale_in_is_one_task_at_a_time_five_minutes_apart(self):
        config, alarm = self.scale_in()
        self.assertEqual(config["AdjustmentType"], "ChangeInCapacity")
        self.assertEqual(config["StepAdjustments"], [{"MetricIntervalUpperBound": 0, "ScalingAdjustment": -DESIGN["scale_in_tasks"]}])
        self.assertGreaterEqual(config["Cooldown"], DESIGN["scale_in_after_scale_out_s"])
        # Every one of the alarm's minutes must be calm, for at least five minutes.
        period = {m["MetricStat"]["Period"] for m in alarm["Metrics"] if "MetricStat" in m}
        self.assertEqual(period, {60})
        self.assertEqual(alarm["DatapointsToAlarm"], alarm["EvaluationPeriods"])
        self.assertGreaterEqual(alarm["EvaluationPeriods"] * 60, DESIGN["scale_in_after_scale_out_s"])
        self.assertEqual(alarm["TreatMissingData"], "notBreaching", "missing data is not calm")

    def calm(self, alarm, **values):
        """Evaluates the scale-in alarm's expression for one minute's figures (None: missing)."""
        metrics = {m["Id"]: m for m in alarm["Metrics"]}
        (expression,) = [m for m in alarm["Metrics"] if m.get("ReturnData", True)]
        names = {}
        for id_, m in metrics.items():
            if "MetricStat" in m:
                names[id_] = values[m["MetricStat"]["Metric"]["MetricName"]]
        text = expression["Expression"]
        self.assertRegex(text, r"^[A-Za-z0-9_ .*/+()\[\],-]+$")
        env = {"MAX": max, "FILL": lambda x, default: default if x is None else x, **names}
        load = eval(text, {"__builtins__": {}}, env)  # noqa: S307 (checked characters above)
        return {"LessThanThreshold": load < alarm["Threshold"]}[alarm["ComparisonOperator"]]

    def test_a_minute_in_which_any_scale_out_trigger_holds_is_not_calm(self):
        _, alarm = self.scale_in()
        quiet = {
            "CPUUtilization": 10,
            "MemoryUtilization": 10,
            "Connections": 100,
            "DeliveryLatencyP99": 20,
            "Outbox": 0,
        }
        self.assertTrue(self.calm(alarm, **quiet), "a quiet minute is calm")
        self.assertTrue(self.calm(alarm, **{**quiet, "DeliveryLatencyP99": None, "Outbox": None}), "no deliveries")
        at_trigger = {
            "CPUUtilization": DESIGN["target_tracking"]["ECSServiceAverageCPUUtilization"],
            "MemoryUtilization": DESIGN["target_tracking"]["ECSServiceAverageMemoryUtilization"],
            "Connections": DESIGN["target_tracking"]["Connections"],
            "DeliveryLatencyP99": DESIGN["step_out"]["DeliveryLatencyP99"][0],
            "Outbox": DESIGN["step_out"]["Outbox"][0],
        }
        for metric, value in at_trigger.items():
            self.assertFalse(self.calm(alarm, **{**quiet, metric: value}), f"{metric} at its scale-out threshold")
        # Removing one task of two or more at most doubles the per-task figures: calm means
        # below half of each scale-out threshold, so a scale-in never triggers a scale-out.
        for metric, value in at_trigger.items():
            if metric == "Outbox":
                continue
            self.assertFalse(self.calm(alarm, **{**quiet, metric: value / 2}), f"{metric} at half its threshold")
            self.assertTrue(self.calm(alarm, **{**quiet, metric: value / 2 - 1}), f"{metric} below half its threshold")
        self.assertFalse(self.calm(alarm, **{**quiet, "Outbox": 1}), "a task with publishes queued for Redis")

    def test_the_connection_target_follows_its_parameter(self):
        stack = Stack(ConnectionsPerTaskTarget=8000)
        policies = stack.of_type("AWS::ApplicationAutoScaling::ScalingPolicy")
        config = policies["ScaleOnConnections"]["Properties"]["TargetTrackingScalingPolicyConfiguration"]
        self.assertEqual(config["TargetValue"], 8000)
        low = stack.resource("LowLoadAlarm")["Properties"]
        self.assertIn("/ 8000", [m for m in low["Metrics"] if "Expression" in m][0]["Expression"])


class CostOptions(unittest.TestCase):
    def test_by_default_every_task_is_on_demand_and_the_range_never_changes(self):
        stack = Stack()
        service = stack.resource("Service")["Properties"]
        self.assertNotIn("LaunchType", service)
        self.assertEqual(service["CapacityProviderStrategy"], [{"CapacityProvider": "FARGATE", "Weight": 1}])
        self.assertNotIn("ScheduledActions", stack.resource("ScalableTarget")["Properties"])

    def test_spot_keeps_a_base_on_demand_and_puts_the_rest_on_spot(self):
        stack = Stack(FargateSpot="on")
        service = stack.resource("Service")["Properties"]
        self.assertEqual(
            service["CapacityProviderStrategy"],
            [
                {"CapacityProvider": "FARGATE", "Base": 3, "Weight": 0},
                {"CapacityProvider": "FARGATE_SPOT", "Weight": 1},
            ],
        )
        cluster = stack.resource("Cluster")["Properties"]
        self.assertEqual(set(cluster["CapacityProviders"]), {"FARGATE", "FARGATE_SPOT"})
        # The drain fits Spot's two-minute notice: SIGTERM, the drain, then the stop timeout.
        task = stack.resource("TaskDefinition")["Properties"]
        (courtside,) = [c for c in task["ContainerDefinitions"] if c["Name"] == "courtside"]
        self.assertLessEqual(courtside["StopTimeout"], 120)
        self.assertLess(stack.params["DrainTimeoutSeconds"], courtside["StopTimeout"])

    def test_off_peak_narrows_the_range_between_its_two_schedules(self):
        stack = Stack(OffPeakScaling="on")
        actions = stack.resource("ScalableTarget")["Properties"]["ScheduledActions"]
        by_name = {a["ScheduledActionName"]: a for a in actions}
        self.assertEqual(set(by_name), {"off-peak", "peak"})
        off, peak = by_name["off-peak"], by_name["peak"]
        self.assertEqual(off["ScalableTargetAction"], {"MinCapacity": 2, "MaxCapacity": 6})
        self.assertEqual(peak["ScalableTargetAction"], {"MinCapacity": DESIGN["min_tasks"], "MaxCapacity": DESIGN["max_tasks"]})
        self.assertEqual(off["Schedule"], "cron(0 22 ? * SUN *)")
        self.assertEqual(peak["Schedule"], "cron(0 6 ? * SAT *)")
        for action in actions:
            self.assertEqual(action["Timezone"], "America/Phoenix")
            # Application Auto Scaling's cron has six fields.
            fields = re.fullmatch(r"cron\((.+)\)", action["Schedule"]).group(1).split()
            self.assertEqual(len(fields), 6, action["Schedule"])
        pattern = stack.template["Parameters"]["OffPeakStartSchedule"]["AllowedPattern"]
        self.assertRegex("cron(30 23 ? * MON-FRI *)", pattern)
        self.assertNotRegex("0 22 * * 0", pattern)

    def test_redis_snapshots_are_the_designs_daily_seven_days(self):
        redis = Stack().template["Resources"]["Redis"]
        self.assertEqual(redis["DeletionPolicy"], "Snapshot")
        props = Stack().resource("Redis")["Properties"]
        self.assertEqual(props["SnapshotRetentionLimit"], 7)
        self.assertEqual(Stack(RedisSnapshotRetentionDays=0).resource("Redis")["Properties"]["SnapshotRetentionLimit"], 0)


class TokensAndHistory(unittest.TestCase):
    def containers(self, stack):
        task = stack.resource("TaskDefinition")["Properties"]
        return {c["Name"]: c for c in task["ContainerDefinitions"]}

    def test_without_jwt_parameters_the_task_gets_no_jwt_setting(self):
        stack = Stack()
        containers = self.containers(stack)
        env = {e["Name"] for e in containers["courtside"]["Environment"]}
        secrets = {s["Name"] for s in containers["courtside"]["Secrets"]}
        self.assertFalse({n for n in env | secrets if "JWT" in n}, (env, secrets))
        self.assertFalse([s for s in containers["certs"]["Secrets"] if s["Name"] == "JWT_KEYS"])
        self.assertIn("--history-size=1000", containers["courtside"]["Command"])
        self.assertIn("--history-ttl=10m", containers["courtside"]["Command"])
        self.assertIn("--history-bytes=16777216", containers["courtside"]["Command"])

    def test_jwt_parameters_reach_the_task_and_the_role_may_read_them(self):
        secret = "arn:aws:secretsmanager:us-west-2:111122223333:secret:courtside/jwt-AbCdEf"
        keys = "arn:aws:secretsmanager:us-west-2:111122223333:secret:courtside/jwt-keys-AbCdEf"
        stack = Stack(JwtSecretArn=secret, JwtKeysSecretArn=keys, JwtIssuer="https://id.example.org", HistorySize=50)
        containers = self.containers(stack)
        env = {e["Name"]: e["Value"] for e in containers["courtside"]["Environment"]}
        secrets = {s["Name"]: s["ValueFrom"] for s in containers["courtside"]["Secrets"]}
        self.assertEqual(secrets["COURTSIDE_JWT_SECRET"], secret)
        self.assertEqual(env["COURTSIDE_JWT_ISSUER"], "https://id.example.org")
        self.assertNotIn("COURTSIDE_JWT_AUDIENCE", env)
        # The keys file is written by the certs container into the task's volume.
        self.assertEqual(env["COURTSIDE_JWT_KEYS"], "/certs/jwt-keys")
        self.assertIn({"Name": "JWT_KEYS", "ValueFrom": keys}, containers["certs"]["Secrets"])
        self.assertIn("/certs/jwt-keys", containers["certs"]["Command"][0])
        self.assertIn("--history-size=50", containers["courtside"]["Command"])
        role = stack.resource("ExecutionRole")["Properties"]["Policies"][0]["PolicyDocument"]["Statement"][0]
        self.assertIn(secret, role["Resource"])
        self.assertIn(keys, role["Resource"])


class Runbook(unittest.TestCase):
    def test_step_2_runs_in_a_fresh_clone(self):
        """Step 2's local commands (up to the upload), in a copy of the repository without target/."""
        import shutil
        import subprocess
        import tempfile
        import zipfile

        readme = (HERE / "README.md").read_text()
        deploy = readme.split("## Deploy", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
        step = deploy.split("# 2.", 1)[1].split("\n# 3.", 1)[0]
        commands = [line for line in step.splitlines()[1:] if line.strip() and not line.startswith("aws ")]
        self.assertTrue(commands, step)
        self.assertIsNotNone(shutil.which("zip"), "the runbook needs zip (tests/run.sh installs it)")
        with tempfile.TemporaryDirectory() as clone:
            shutil.copytree(HERE / "quic-register", pathlib.Path(clone) / "deploy" / "quic-register")
            subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(commands)], cwd=clone, check=True)
            with zipfile.ZipFile(pathlib.Path(clone) / "target" / "quic-register.zip") as z:
                # The function's handler is handler.lambda_handler: handler.py at the root.
                self.assertEqual(z.namelist(), ["handler.py"])

    def test_every_parameter_is_in_the_runbooks_table(self):
        readme = (HERE / "README.md").read_text()
        table = readme.split("## Parameters", 1)[1].split("\n## ", 1)[0]
        documented = set(re.findall(r"`([A-Za-z]+)`", table))
        missing = set(load_template()["Parameters"]) - documented
        self.assertFalse(missing, f"parameters missing from deploy/README.md, Parameters: {sorted(missing)}")


if __name__ == "__main__":
    unittest.main()
