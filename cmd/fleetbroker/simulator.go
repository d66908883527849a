package main

import (
	"context"
	"flag"
	"net"
	"net/http"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/httpserve"
	"github.com/fleetbroker/fleetbroker/services/simulator"
)

func runSimulator(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("simulator", flag.ContinueOnError)
	var listen string
	cfg := simulator.Config{Demo: true}
	fs.StringVar(&listen, "listen", simulator.DefaultListen, "HTTP listen address")
	fs.DurationVar(&cfg.Latency, "latency", 0, "added latency of every reply")
	fs.DurationVar(&cfg.JWTLifetime, "jwt-lifetime", simulator.DefaultJWTLifetime, "lifetime of FleetUp JWTs")
	fs.DurationVar(&cfg.WialonIdleTimeout, "wialon-idle-timeout", simulator.DefaultWialonIdleTimeout, "idle time after which a Wialon session answers error 1")
	fs.IntVar(&cfg.Units, "units", simulator.DefaultUnits, "units in the demo fleet")
	fs.Float64Var(&cfg.Faults.ErrorRate, "fault-error-rate", 0, "fraction of replies that are 5xx")
	fs.Float64Var(&cfg.Faults.RateLimitRate, "fault-rate-limit-rate", 0, "fraction of replies that are 429 / Wialon error 1003")
	fs.Float64Var(&cfg.Faults.SlowRate, "fault-slow-rate", 0, "fraction of replies delayed by --fault-slow-delay")
	fs.DurationVar(&cfg.Faults.SlowDelay, "fault-slow-delay", 2*time.Second, "delay of slow replies")
	fs.Float64Var(&cfg.FleetUpAccountRate, "fleetup-account-rate", 0, "FleetUp requests per second each account may make before 429 with Retry-After (0: no limit)")
	fs.IntVar(&cfg.FleetUpAccountBurst, "fleetup-account-burst", 1, "FleetUp requests each account may make at once above --fleetup-account-rate")
	logf := addLogFlags(fs, "json")
	if err := parse(fs, args); err != nil {
		return err
	}
	logger, err := newLogger(logf.format, logf.level)
	if err != nil {
		return err
	}
	lis, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	logger.Info("simulator listening", "addr", lis.Addr().String())
	srv := &http.Server{Handler: simulator.New(cfg).Handler(), ReadHeaderTimeout: 5 * time.Second}
	return httpserve.Serve(ctx, srv, lis)
}
