# syntax=docker/dockerfile:1
# Multi-stage build of the one fleetbroker binary: static, non-root, distroless.
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o /out/fleetbroker ./cmd/fleetbroker

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/fleetbroker /fleetbroker
USER nonroot:nonroot
ENTRYPOINT ["/fleetbroker"]
