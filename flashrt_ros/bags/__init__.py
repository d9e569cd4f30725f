"""Episodes as rosbag2 MCAP bags: the message types, the recorder and the lockstep player."""
