// A Node caller of refund-gate, as docs/CLIENTS.md describes it: @grpc/grpc-js with the
// repository's proto/ and google/rpc/*.proto from the google-proto-files package.
//
//   node tests/node/check.js HOST:PORT PROTO_DIR
//
// Prints one JSON line per step: a decision, its retry (same refund_id), and an invalid request
// whose google.rpc.BadRequest is decoded from the grpc-status-details-bin trailer.
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");
const googleProtos = require("google-proto-files");

const [target, protoDir] = process.argv.slice(2);
const googleDir = path.resolve(googleProtos.getProtoPath("rpc", "status.proto"), "..", "..", "..");

const definition = protoLoader.loadSync("refundgate/v1/refund_gate.proto", {
  includeDirs: [protoDir],
  keepCase: true, // field names as in the .proto: refund_id, not refundId
  longs: String, // int64 amounts as strings: no precision lost
  enums: String,
  defaults: true,
});
const { RefundGate } = grpc.loadPackageDefinition(definition).refundgate.v1;
const client = new RefundGate(target, grpc.credentials.createInsecure());

// google.rpc.Status and the error details, for the trailer of an error answer.
const rpc = new protobuf.Root();
rpc.resolvePath = (_origin, target) => path.join(googleDir, target);
rpc.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"], { keepCase: true });
const Status = rpc.lookupType("google.rpc.Status");

function errorDetails(err) {
  const [raw] = err.metadata.get("grpc-status-details-bin");
  if (!raw) return [];
  return Status.decode(raw).details.map((any) => {
    const type = rpc.lookupType(any.type_url.split("/").pop());
    return { type: type.fullName.slice(1), ...type.toObject(type.decode(any.value)) };
  });
}

function check(request) {
  // Deadline: the gate answers within its budget (25 ms by default); give the network some room.
  const deadline = new Date(Date.now() + 1000);
  return new Promise((resolve) => {
    client.Check(request, { deadline }, (err, response) => resolve({ err, response }));
  });
}

function timestamp(msAgo) {
  const ms = Date.now() - msAgo;
  return { seconds: String(Math.floor(ms / 1000)), nanos: (ms % 1000) * 1e6 };
}

function request(overrides) {
  return {
    refund_id: "rf:node-1",
    account_id: "acct:node",
    order_id: "ord:node-1",
    merchant_id: "m:node",
    amount_minor: "2500",
    order_amount_minor: "5000",
    currency: "EUR",
    reason: "REFUND_REASON_DAMAGED",
    item_category: "ITEM_CATEGORY_PHYSICAL",
    delivery_status: "DELIVERY_STATUS_DELIVERED",
    payment_method: "PAYMENT_METHOD_CARD",
    item_returned: true,
    order_created_at: timestamp(3 * 86400 * 1000),
    ...overrides,
  };
}

async function main() {
  const steps = [
    ["decided", request({})],
    ["retried", request({})], // same refund_id, same content: the same decision, replayed
    ["invalid", request({ refund_id: "rf:node-2", currency: "euro" })],
  ];
  for (const [step, req] of steps) {
    const { err, response } = await check(req);
    if (err) {
      const code = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code);
      console.log(JSON.stringify({ step, code, message: err.details, details: errorDetails(err) }));
    } else {
      console.log(JSON.stringify({ step, ...response }));
    }
  }
  client.close();
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
