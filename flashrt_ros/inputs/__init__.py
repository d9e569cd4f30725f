"""The input side: sensor messages -> the policy's named inputs, without ROS imports.

    images.py      sensor_msgs/Image and CompressedImage -> uint8 [H, W, 3] RGB frames (and back)
    preprocess.py  a frame -> the policy's image buffer (LeRobot's resize-with-pad, normalised),
                   a CuPy kernel on CUDA held to the torch reference
    sync.py        named streams (the state, each camera) joined by stamp within a slop

The modules read messages by their fields (duck-typed), so they import and test without ROS; the
node subscribes, hands the messages here, and writes what comes out into the runtime's static
inputs. The policy never sees a message.
"""
