package provider

import (
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	telematicsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/telematics/v1"
)

// TripEnd is where and when a trip started or ended, as every provider
// reports it. Lat and Lon are degrees; both 0 means the provider gave no
// coordinates.
type TripEnd struct {
	Time     time.Time
	Lat, Lon float64
}

// NewTrip is the one conversion of a provider's trip to telematics.v1.
func NewTrip(unitID string, start, end TripEnd, distanceM float64) *telematicsv1.Trip {
	return &telematicsv1.Trip{UnitId: unitID,
		StartTime: timestamppb.New(start.Time), EndTime: timestamppb.New(end.Time),
		StartPosition: start.position(unitID), EndPosition: end.position(unitID),
		DistanceM: distanceM}
}

// position is nil when the provider gave no coordinates.
func (e TripEnd) position(unitID string) *telematicsv1.Position {
	if e.Lat == 0 && e.Lon == 0 {
		return nil
	}
	return &telematicsv1.Position{UnitId: unitID, Time: timestamppb.New(e.Time), Latitude: e.Lat, Longitude: e.Lon}
}
