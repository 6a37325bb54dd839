//! The common IPSO Smart Objects (OMA registry, IPSO Alliance objects 33xx), as their
//! specifications define them.

use super::{builtin_object, o, r, ObjectModel, Operations, ResourceModel};
use crate::content::ResourceType;

use Operations::{Execute as E, Read as R, ReadWrite as RW};
use ResourceType::{Boolean as BOOL, Float as FLOAT, Integer as INT, None as EXEC, String as STR, Time as TIME};

/// The resources every IPSO sensor of version 1.1 shares, around its measured value, with
/// the object's own between 5750 and 6042 (the table stays in ID order).
macro_rules! sensor {
    ($units:expr $(, $own:expr)*) => {
        [
            r(5518, "Timestamp", R, false, TIME, ""),
            r(5601, "Min Measured Value", R, false, FLOAT, $units),
            r(5602, "Max Measured Value", R, false, FLOAT, $units),
            r(5603, "Min Range Value", R, false, FLOAT, $units),
            r(5604, "Max Range Value", R, false, FLOAT, $units),
            r(5605, "Reset Min and Max Measured Values", E, false, EXEC, ""),
            r(5700, "Sensor Value", R, false, FLOAT, $units),
            r(5701, "Sensor Units", R, false, STR, ""),
            r(5750, "Application Type", RW, false, STR, ""),
            $($own,)*
            r(6042, "Measurement Quality Indicator", R, false, INT, ""),
            r(6049, "Measurement Quality Level", R, false, INT, ""),
            r(6050, "Fractional Timestamp", R, false, FLOAT, "s"),
        ]
    };
}

/// Temperature, object 3303.
pub const TEMPERATURE: ObjectModel = builtin_object!(3303, "Temperature", true, sensor!("Cel"));
/// Humidity, object 3304.
pub const HUMIDITY: ObjectModel = builtin_object!(3304, "Humidity", true, sensor!("%RH"));
/// Illuminance, object 3301.
pub const ILLUMINANCE: ObjectModel = builtin_object!(3301, "Illuminance", true, sensor!("lx"));
/// Pressure, object 3323.
pub const PRESSURE: ObjectModel =
    builtin_object!(3323, "Pressure", true, sensor!("Pa", r(5821, "Current Calibration", RW, false, FLOAT, "Pa")));

/// Light Control, object 3311.
pub const LIGHT_CONTROL: ObjectModel = builtin_object!(
    3311,
    "Light Control",
    true,
    [
        r(5701, "Sensor Units", R, false, STR, ""),
        r(5706, "Colour", RW, false, STR, ""),
        r(5750, "Application Type", RW, false, STR, ""),
        r(5805, "Cumulative active power", R, false, FLOAT, "Wh"),
        r(5820, "Power factor", R, false, FLOAT, ""),
        r(5850, "On/Off", RW, false, BOOL, ""),
        r(5851, "Dimmer", RW, false, INT, "%"),
        r(5852, "On time", RW, false, INT, "s"),
    ],
);

/// Accelerometer, object 3313.
pub const ACCELEROMETER: ObjectModel = builtin_object!(
    3313,
    "Accelerometer",
    true,
    [
        r(5518, "Timestamp", R, false, TIME, ""),
        r(5603, "Min Range Value", R, false, FLOAT, ""),
        r(5604, "Max Range Value", R, false, FLOAT, ""),
        r(5701, "Sensor Units", R, false, STR, ""),
        r(5702, "X Value", R, false, FLOAT, ""),
        r(5703, "Y Value", R, false, FLOAT, ""),
        r(5704, "Z Value", R, false, FLOAT, ""),
        r(5750, "Application Type", RW, false, STR, ""),
        r(6042, "Measurement Quality Indicator", R, false, INT, ""),
        r(6049, "Measurement Quality Level", R, false, INT, ""),
        r(6050, "Fractional Timestamp", R, false, FLOAT, "s"),
    ],
);

/// Timer, object 3340.
pub const TIMER: ObjectModel = builtin_object!(
    3340,
    "Timer",
    true,
    [
        r(5501, "Digital Input Counter", R, false, INT, ""),
        r(5521, "Delay Duration", RW, false, FLOAT, "s"),
        r(5523, "Trigger", E, false, EXEC, ""),
        r(5525, "Minimum Off-time", RW, false, FLOAT, "s"),
        r(5526, "Timer Mode", RW, false, INT, ""),
        r(5534, "Counter", RW, false, INT, ""),
        r(5538, "Remaining Time", R, false, FLOAT, "s"),
        r(5543, "Digital State", R, false, BOOL, ""),
        r(5544, "Cumulative Time", RW, false, FLOAT, "s"),
        r(5750, "Application Type", RW, false, STR, ""),
        r(5850, "On/Off", RW, false, BOOL, ""),
    ],
);
