package app

import (
	"testing"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/transit"
)

// The --transit-batch-* flags: batching is on by default, size 1 turns it
// off (the service talks to the backend directly), and nonsense is refused
// before anything starts.
func TestBatchedTransit(t *testing.T) {
	backend, err := transit.NewKeyring()
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		opts    transit.BatchOptions
		batched bool
		wantErr bool
	}{
		{"defaults", transit.BatchOptions{}, true, false},
		{"flag defaults", transit.BatchOptions{MaxItems: transit.DefaultBatchMaxItems, MaxInFlight: transit.DefaultBatchMaxInFlight}, true, false},
		{"lingering", transit.BatchOptions{MaxWait: time.Millisecond}, true, false},
		{"size 1 is off", transit.BatchOptions{MaxItems: 1}, false, false},
		{"negative size", transit.BatchOptions{MaxItems: -1}, false, true},
		{"negative calls", transit.BatchOptions{MaxInFlight: -2}, false, true},
		{"negative wait", transit.BatchOptions{MaxWait: -time.Millisecond}, false, true},
		{"wait too long", transit.BatchOptions{MaxWait: time.Second}, false, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tr, err := batchedTransit(backend, tt.opts)
			if (err != nil) != tt.wantErr {
				t.Fatalf("batchedTransit(%+v) error = %v, want error %t", tt.opts, err, tt.wantErr)
			}
			if err != nil {
				return
			}
			_, batched := tr.(*transit.Batching)
			if batched != tt.batched || (!batched && tr != transit.Transit(backend)) {
				t.Errorf("batchedTransit(%+v) = %T, want batched %t", tt.opts, tr, tt.batched)
			}
		})
	}
}
