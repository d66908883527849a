// Command watch-positions is the smallest correct caller of the gateway: it
// keeps a session handle alive with client.HandleSource, lists a
// credential's units, and prints position updates from WatchPositions.
//
// Against `fleetbroker dev` (in another terminal):
//
//	go run ./examples/watch-positions
//
// It runs until it has printed -updates batches, or Ctrl-C.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/fleetbroker/fleetbroker/client"
	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
)

type config struct {
	// credentialsAddr issues handles; gatewayAddr serves telematics. In dev
	// both are the same port.
	credentialsAddr, gatewayAddr string
	tenant, credential           string
	units                        int
	updates                      int
	interval                     time.Duration
}

func main() {
	var cfg config
	flag.StringVar(&cfg.credentialsAddr, "credentials", "localhost:7400", "credentials service address")
	flag.StringVar(&cfg.gatewayAddr, "gateway", "localhost:7400", "gateway address")
	flag.StringVar(&cfg.tenant, "tenant", "demo", "tenant id")
	flag.StringVar(&cfg.credential, "credential", "wialon-demo", "credential id (fleetup-demo works too)")
	flag.IntVar(&cfg.units, "units", 5, "how many units to list")
	flag.IntVar(&cfg.updates, "updates", 3, "stop after this many position updates (0: run until Ctrl-C)")
	flag.DurationVar(&cfg.interval, "interval", 2*time.Second, "minimum interval between updates")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := run(ctx, cfg, os.Stdout); err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintln(os.Stderr, "watch-positions:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, cfg config, out io.Writer) error {
	// Plaintext is for `fleetbroker dev` only: in production both
	// connections use TLS (grpc/credentials.NewTLS) and the handle source
	// keeps AllowInsecure false.
	plaintext := grpc.WithTransportCredentials(insecure.NewCredentials())
	credConn, err := grpc.NewClient(cfg.credentialsAddr, plaintext)
	if err != nil {
		return err
	}
	defer credConn.Close()
	source := client.NewHandleSource(credentialsv1.NewSessionServiceClient(credConn),
		client.Session{TenantID: cfg.tenant, CredentialID: cfg.credential, TTL: 10 * time.Minute},
		client.Options{AllowInsecure: true})
	defer source.Close()

	gwConn, err := grpc.NewClient(cfg.gatewayAddr, append(source.DialOptions(), plaintext)...)
	if err != nil {
		return err
	}
	defer gwConn.Close()
	gateway := telematicsv1.NewTelematicsServiceClient(gwConn)

	listCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	units, err := gateway.ListUnits(listCtx, &telematicsv1.ListUnitsRequest{PageSize: int32(cfg.units)})
	cancel()
	if err != nil {
		return explain("list units", err)
	}
	ids := make([]string, 0, len(units.GetUnits()))
	for _, u := range units.GetUnits() {
		fmt.Fprintf(out, "unit %s %q\n", u.GetUnitId(), u.GetName())
		ids = append(ids, u.GetUnitId())
	}

	stream, err := gateway.WatchPositions(ctx, &telematicsv1.WatchPositionsRequest{UnitIds: ids, MinInterval: durationpb.New(cfg.interval)})
	if err != nil {
		return explain("watch positions", err)
	}
	for n := 0; cfg.updates == 0 || n < cfg.updates; n++ {
		msg, err := stream.Recv()
		if err != nil {
			return explain("watch positions", err)
		}
		for _, p := range msg.GetPositions() {
			fmt.Fprintf(out, "position %s %s %.5f,%.5f %.0f km/h\n", p.GetUnitId(), p.GetTime().AsTime().Format(time.RFC3339), p.GetLatitude(), p.GetLongitude(), p.GetSpeedKmh())
		}
	}
	return nil
}

// explain turns a status into what the operator of this program should do.
func explain(op string, err error) error {
	switch {
	case client.IsCredentialRejected(err):
		return fmt.Errorf("%s: the provider rejected the stored credential; the customer must replace it: %w", op, err)
	case client.IsCredentialGone(err):
		return fmt.Errorf("%s: the credential does not exist: %w", op, err)
	case client.IsRetryable(err):
		delay, _ := client.RetryDelay(err)
		return fmt.Errorf("%s: try again in %s: %w", op, delay, err)
	}
	return fmt.Errorf("%s: %w", op, err)
}
