package client

// ServiceConfig is the gRPC service config for connections to the gateway:
// grpc-go's own retryPolicy, inside the project's retry budget
// (docs/reliability.md, "Retry budget"):
//
//   - only the reads that have no side effects are retried, at most once
//     more (maxAttempts 2), and only on UNAVAILABLE — the gateway already
//     retries its upstream call up to three times within the caller's
//     deadline, so one retry here bounds a failing provider at six upstream
//     requests per caller call;
//   - RESOURCE_EXHAUSTED is never retried automatically: its RetryInfo says
//     how long to wait (RetryDelay), and retrying sooner spends the shared
//     budget of every caller of that account;
//   - retryThrottling stops retries when more than about one call in ten
//     fails, so an outage does not double the load on a struggling gateway;
//   - the caller's deadline bounds every attempt together.
//
// CallProvider (the raw pass-through) and WatchPositions are not retried.
const ServiceConfig = `{
  "methodConfig": [{
    "name": [
      {"service": "fleetbroker.telematics.v1.TelematicsService", "method": "ListUnits"},
      {"service": "fleetbroker.telematics.v1.TelematicsService", "method": "GetLatestPositions"},
      {"service": "fleetbroker.telematics.v1.TelematicsService", "method": "GetPositionHistory"},
      {"service": "fleetbroker.telematics.v1.TelematicsService", "method": "ListTrips"}
    ],
    "retryPolicy": {
      "maxAttempts": 2,
      "initialBackoff": "0.2s",
      "maxBackoff": "1s",
      "backoffMultiplier": 2,
      "retryableStatusCodes": ["UNAVAILABLE"]
    }
  }],
  "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1}
}`
