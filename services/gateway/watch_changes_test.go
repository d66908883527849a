package gateway

import (
	"slices"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
)

// TestWatcherChanges: the hub numbers changes once for all its watchers; a
// watcher sends everything it asked for first, then only what moved or got
// a newer fix since it last sent, even when it skipped a poll result (a
// slow stream only ever takes the newest).
func TestWatcherChanges(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	pos := func(unit string, sec int, lat float64) *telematicsv1.Position {
		return &telematicsv1.Position{UnitId: unit, Time: timestamppb.New(t0.Add(time.Duration(sec) * time.Second)), Latitude: lat, Longitude: 1}
	}
	polls := [][]*telematicsv1.Position{
		{pos("a", 0, 1), pos("b", 0, 1), pos("c", 0, 1)},
		{pos("a", 0, 1), pos("b", 5, 1), pos("c", 0, 1)}, // b: newer fix
		{pos("a", 0, 1), pos("b", 5, 1), pos("c", 0, 2)}, // c: moved
		{pos("a", 0, 1), pos("b", 5, 1), pos("c", 0, 2)}, // nothing
	}
	tests := []struct {
		name  string
		units []string
		takes []int      // which poll results the watcher takes, in order
		want  [][]string // unit ids sent for each
	}{
		{"every poll", nil, []int{0, 1, 2, 3}, [][]string{{"a", "b", "c"}, {"b"}, {"c"}, nil}},
		{"skips a poll", nil, []int{0, 2}, [][]string{{"a", "b", "c"}, {"b", "c"}}},
		{"joins late", nil, []int{2, 3}, [][]string{{"a", "b", "c"}, nil}},
		{"some units", []string{"c"}, []int{0, 1, 2}, [][]string{{"c"}, nil, {"c"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := &hub{}
			results := make([]pollResult, len(polls))
			for i, p := range polls {
				results[i] = pollResult{positions: p}
				h.markChanges(&results[i])
			}
			w := &watcher{}
			if tt.units != nil {
				w.units = map[string]bool{}
				for _, u := range tt.units {
					w.units[u] = true
				}
			}
			for i, take := range tt.takes {
				var got []string
				for _, p := range w.changes(results[take]) {
					got = append(got, p.GetUnitId())
				}
				w.sentAny = true
				if !slices.Equal(got, tt.want[i]) {
					t.Fatalf("take %d (poll %d): sent %v, want %v", i, take, got, tt.want[i])
				}
			}
		})
	}
}
