"""The embedded local stack provisions every resource the pipelines need."""
import json


def test_stack_provisions_resources_and_seeds_nested_users(stack):
    kinesis = stack.client("kinesis")
    summary = kinesis.describe_stream_summary(StreamName=stack.config.stream)["StreamDescriptionSummary"]
    assert summary["StreamStatus"] == "ACTIVE"
    assert summary["OpenShardCount"] == 2

    seeded = stack.seed_users(
        [{"user_id": "u1", "plan": {"tier": "pro", "price": 9.99}, "tags": ["a", "b"]}]
    )
    assert seeded == 1
    item = stack.client("dynamodb").get_item(
        TableName=stack.config.users_table, Key={"user_id": {"S": "u1"}}
    )["Item"]
    assert item["plan"]["M"]["tier"] == {"S": "pro"}
    assert item["tags"]["L"] == [{"S": "a"}, {"S": "b"}]

    sqs = stack.client("sqs")
    sqs.send_message(QueueUrl=stack.queue_url, MessageBody=json.dumps({"x": 1}))
    assert sqs.receive_message(QueueUrl=stack.queue_url)["Messages"]

    stack.client("s3").put_object(Bucket=stack.config.bucket, Key="k", Body=b"v")
    assert stack.env()["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
