package simulator

import (
	"fmt"
	"math"
	"time"
)

// The demo fleet drives loops around a few cities. Everything a unit reports
// is a pure function of (unit, time), so any two polls agree with each other,
// history and "last position" never contradict, and nothing needs storing.

const (
	// cycle is one drive-then-park period; units drive for driveTime of it.
	cycle     = time.Hour
	driveTime = 40 * time.Minute
	// msgEvery is the reporting interval of the simulated trackers.
	msgEvery = time.Minute
	// metresPerDegLat is close enough for a simulator.
	metresPerDegLat = 111_320.0
)

type city struct {
	name     string
	lat, lon float64
	alt      float64
}

var cities = []city{
	{"Berlin", 52.5200, 13.4050, 34},
	{"Minsk", 53.9006, 27.5590, 220},
	{"Austin", 30.2672, -97.7431, 149},
	{"Mexico City", 19.4326, -99.1332, 2240},
	{"Nairobi", -1.2921, 36.8219, 1795},
}

// unit is one simulated vehicle. Wialon sees it as an avl_unit with ID,
// FleetUp as a device with DevID.
type unit struct {
	idx    int
	ID     int64
	DevID  string
	Name   string
	city   city
	radius float64       // metres
	lap    time.Duration // driving time for one loop
	offset time.Duration // where in its cycle the unit is at t=0
	phase  float64       // starting angle, radians
}

func newFleet(n int, seed int64) []unit {
	units := make([]unit, n)
	for i := range units {
		h := mix(uint64(seed), uint64(i))
		units[i] = unit{
			idx:    i,
			ID:     10_001 + int64(i),
			DevID:  fmt.Sprintf("SIM%06d", i+1),
			Name:   fmt.Sprintf("Sim Truck %03d", i+1),
			city:   cities[i%len(cities)],
			radius: 1500 + float64(h%6500),                                // 1.5–8 km
			lap:    20*time.Minute + time.Duration(h>>8%1200)*time.Second, // 20–40 min
			offset: time.Duration(h>>20%uint64(cycle/time.Second)) * time.Second,
			phase:  float64(h>>32%360) * math.Pi / 180,
		}
	}
	return units
}

// mix is splitmix64 over seed and index: cheap, deterministic, well spread.
func mix(seed, i uint64) uint64 {
	z := seed + (i+1)*0x9e3779b97f4a7c15
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

// fix is one position report.
type fix struct {
	T          time.Time
	Lat, Lon   float64
	Alt        float64
	Speed      float64 // km/h
	Course     float64 // degrees clockwise from north
	Satellites int
}

// at returns where u is at t.
func (u unit) at(t time.Time) fix {
	sec := t.Unix() + int64(u.offset/time.Second)
	cyc := int64(cycle / time.Second)
	drive := int64(driveTime / time.Second)
	k, p := floorDiv(sec, cyc)
	driven := k*drive + min(p, drive) // seconds spent driving since the epoch
	lap := float64(u.lap / time.Second)
	theta := u.phase + 2*math.Pi*float64(driven%int64(lap))/lap

	north, east := u.radius*math.Sin(theta), u.radius*math.Cos(theta)
	f := fix{
		T:          t.Truncate(time.Second),
		Lat:        u.city.lat + north/metresPerDegLat,
		Lon:        u.city.lon + east/(metresPerDegLat*math.Cos(u.city.lat*math.Pi/180)),
		Alt:        u.city.alt,
		Satellites: 7 + int((sec/60)%6),
	}
	if p < drive {
		f.Speed = math.Round(2*math.Pi*u.radius/lap*3.6*10) / 10
	}
	// Counter-clockwise travel: velocity points along (-sin θ, cos θ) in (east, north).
	f.Course = math.Mod(math.Atan2(-math.Sin(theta), math.Cos(theta))*180/math.Pi+360, 360)
	return f
}

// fixes returns one report per msgEvery in [from, to].
func (u unit) fixes(from, to time.Time, limit int) (out []fix, total int) {
	step := int64(msgEvery / time.Second)
	first, _ := floorDiv(from.Unix()+step-1, step)
	for s := first * step; s <= to.Unix(); s += step {
		total++
		if len(out) < limit {
			out = append(out, u.at(time.Unix(s, 0)))
		}
	}
	return out, total
}

// trip is one driving period, clipped to the asked interval.
type trip struct {
	From, To fix
	Metres   float64
}

// trips returns the driving periods overlapping [from, to], clipped to it.
func (u unit) trips(from, to time.Time) []trip {
	if !from.Before(to) {
		return nil
	}
	cyc := int64(cycle / time.Second)
	off := int64(u.offset / time.Second)
	k, _ := floorDiv(from.Unix()+off, cyc)
	var out []trip
	for ; ; k++ {
		start := time.Unix(k*cyc-off, 0)
		end := start.Add(driveTime)
		if !start.Before(to) {
			return out
		}
		if !end.After(from) {
			continue
		}
		if start.Before(from) {
			start = from
		}
		if end.After(to) {
			end = to
		}
		a, b := u.at(start), u.at(end)
		speed := 2 * math.Pi * u.radius / float64(u.lap/time.Second) // m/s
		out = append(out, trip{From: a, To: b, Metres: math.Round(speed * end.Sub(start).Seconds())})
	}
}

func floorDiv(a, b int64) (q, r int64) {
	q, r = a/b, a%b
	if r < 0 {
		q, r = q-1, r+b
	}
	return q, r
}
