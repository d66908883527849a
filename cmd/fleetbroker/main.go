// Command fleetbroker is the one binary of fleetbroker. Subcommands:
//
//	fleetbroker credentials   the credentials service (Vault transit + Redis)
//	fleetbroker gateway       the telematics gateway (shared upstream sessions in Redis)
//	fleetbroker simulator     Wialon- and FleetUp-compatible test servers
//	fleetbroker dev           everything in one process on embedded defaults
//	fleetbroker rewrap        rewrap stored ciphertexts after a transit key rotation
//	fleetbroker migrate       re-seal stored secrets under the current associated data
//	fleetbroker version       print build information
//
// Every flag has an environment equivalent: FLEETBROKER_ plus the flag name
// in upper case with dashes as underscores (--vault-addr → FLEETBROKER_VAULT_ADDR).
// A flag given on the command line wins over the environment.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"
)

type command struct {
	name, summary string
	run           func(ctx context.Context, args []string) error
}

func commands() []command {
	return []command{
		{"credentials", "run the credentials service", runCredentials},
		{"gateway", "run the telematics gateway", runGateway},
		{"simulator", "run the Wialon/FleetUp simulator", runSimulator},
		{"dev", "run everything in one process on embedded defaults (development only)", runDev},
		{"rewrap", "rewrap every stored ciphertext under the newest transit key version", runRewrap},
		{"migrate", "re-seal stored secrets under the current associated data version (after an upgrade)", runMigrate},
		{"probe", "check a server's grpc.health.v1 status (container health checks)", runProbe},
		{"version", "print version and build information", runVersion},
	}
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:]); err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "fleetbroker:", err)
		}
		os.Exit(2)
	}
}

func run(ctx context.Context, args []string) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage()
		if len(args) == 0 {
			return errors.New("no subcommand")
		}
		return nil
	}
	for _, c := range commands() {
		if c.name == args[0] {
			return c.run(ctx, args[1:])
		}
	}
	usage()
	return fmt.Errorf("unknown subcommand %q", args[0])
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: fleetbroker <subcommand> [flags]\n\nsubcommands:")
	for _, c := range commands() {
		fmt.Fprintf(os.Stderr, "  %-12s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(os.Stderr, "\nRun 'fleetbroker <subcommand> -h' for its flags. Every flag also reads FLEETBROKER_<FLAG_NAME>.")
}

func runVersion(_ context.Context, _ []string) error {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		fmt.Println("fleetbroker (no build info)")
		return nil
	}
	fmt.Printf("fleetbroker %s\n  go: %s\n", info.Main.Version, info.GoVersion)
	for _, s := range info.Settings {
		switch s.Key {
		case "vcs.revision", "vcs.time", "vcs.modified", "GOOS", "GOARCH":
			fmt.Printf("  %s: %s\n", s.Key, s.Value)
		}
	}
	return nil
}

// newLogger returns the structured logger every subcommand uses.
func newLogger(format, level string) (*slog.Logger, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	opts := &slog.HandlerOptions{Level: lvl}
	switch format {
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	}
	return nil, fmt.Errorf("--log-format must be json or text, not %q", format)
}
