"""A built-in pybullet Franka Panda tabletop benchmark with calvin_env's interface and conventions.

Nothing here needs CALVIN: pybullet and its bundled ``pybullet_data`` (Panda URDF) are enough, so the whole
pipeline (collect demos -> CALVIN-format files -> train -> evaluate) runs on a laptop.

World frame: the robot base sits at the origin on the table top (z = 0), facing +x. The static camera looks
at the table from the far side (from +x towards the robot), so "left"/"right" in the instructions mean the
left/right of that image: right = +y, left = -y.

Conventions copied from calvin_env (the CALVIN notes, sections 1-3):
  * ``robot_obs`` (15): tcp xyz, tcp euler xyz, gripper opening width (m), 7 arm joints, last gripper action.
    Our TCP frame is the Panda's ``panda_grasptarget`` turned by pi about x, so a gripper pointing straight
    down has euler (0, 0, 0) (no +-pi wrap-around in the observation) and the TCP z axis points up.
  * actions: 7-d relative, pos * 0.02 m, euler * 0.05 rad, added to an internal target pose that starts at the
    TCP on reset (``use_target_pose``), gripper -1 close / +1 open; 30 Hz control = 8 physics steps at 240 Hz;
    the target is clipped to a workspace box as calvin_env's ``workspace_bounds`` does.
  * ``scene_obs`` (24, CALVIN's size), see ``SCENE_OBS_LABELS``: green area xy, button depression, button xy,
    light, then red / blue / pink block xyz+euler at CALVIN's offsets 6, 12, 18 (CALVIN's button joint is at
    2 and its LED at 5, as here). The pink block is a distractor that no task uses.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pybullet
import pybullet_data
from pybullet_utils import bullet_client

from dreamvla_jax.envs.base import MAX_REL_ORN, MAX_REL_POS, binarize_gripper, wrap_to_pi

# ----------------------------------------------------------------------------------------------------------
# Scene constants (metres, radians).
# ----------------------------------------------------------------------------------------------------------

PHYSICS_HZ = 240
CONTROL_HZ = 30
ACTION_REPEAT = PHYSICS_HZ // CONTROL_HZ  # 8 physics steps per env step, as calvin_env

BLOCK_HALF = 0.0225          # 4.5 cm cubes: fit the 8 cm Panda gripper even when turned by ~0.3 rad
BLOCK_MASS = 0.1
ZONE_HALF = 0.06             # the green area is 12 x 12 cm
BUTTON_BASE_HALF = (0.035, 0.035, 0.01)
BUTTON_CAP_RADIUS = 0.022
BUTTON_CAP_HALF_HEIGHT = 0.01
BUTTON_TRAVEL = 0.015
BUTTON_PRESS_DEPTH = 0.008   # depression that switches the light on
BUTTON_CAP_TOP = 2 * BUTTON_BASE_HALF[2] + 2 * BUTTON_CAP_HALF_HEIGHT

# Where objects are sampled and where the TCP target may go (calvin_env clips the target the same way).
OBJ_X = (0.40, 0.62)
OBJ_Y = (-0.20, 0.20)
TCP_BOUNDS_LO = np.array([0.25, -0.35, 0.012])
TCP_BOUNDS_HI = np.array([0.75, 0.35, 0.40])
ORN_BOUNDS = np.array([0.5, 0.5, np.pi / 2])   # |roll|, |pitch|, |yaw| of the target, keeps IK sane
HOME_TCP = np.array([0.45, 0.0, 0.22])

# Panda (pybullet_data/franka_panda/panda.urdf) joint indices.
ARM_JOINTS = list(range(7))
FINGER_JOINTS = [9, 10]
HAND_LINK = 8
GRASP_LINK = 11              # panda_grasptarget, between the finger pads
ARM_FORCES = [87.0] * 4 + [12.0] * 3
FINGER_FORCE = 40.0
FINGER_OPEN = 0.04
JOINT_LO = [-2.9671, -1.8326, -2.9671, -3.1416, -2.9671, -0.0873, -2.9671]
JOINT_HI = [2.9671, 1.8326, 2.9671, 0.0, 2.9671, 3.8223, 2.9671]
REST_JOINTS = [0.0, -0.25, 0.0, -2.3, 0.0, 2.05, np.pi / 4]
# TCP frame = grasp frame turned by pi about x (see module docstring).
TCP_IN_GRASP = pybullet.getQuaternionFromEuler([np.pi, 0.0, 0.0])

# Cameras: CALVIN's resolutions. The static pose/fov frame the object area (x 0.40-0.62, y +-0.20) tightly,
# with the hovering hand at the top edge: a 4.5 cm block is ~6 px wide at the policy's 64 px (~3 px with the
# wider view this replaced), which is what the small from-scratch vision tower needs to localise it.
STATIC_SIZE = 200
GRIPPER_SIZE = 84
STATIC_EYE = (1.05, 0.0, 0.75)
STATIC_TARGET = (0.48, 0.0, 0.03)
STATIC_FOV = 34.0
STATIC_NEAR, STATIC_FAR = 0.4, 2.0
GRIPPER_FOV = 75.0           # calvin_env's gripper camera
GRIPPER_NEAR, GRIPPER_FAR = 0.01, 1.0
GRIPPER_CAM_UP = 0.115       # camera 11.5 cm above the finger pads along the TCP z axis (which points up)...
GRIPPER_CAM_FORWARD = 0.05   # ... and 5 cm forward (TCP x), so the fingers stay at the image edge
GRIPPER_CAM_LOOK = 0.15      # it looks at a point this far below the pads

COLORS = {
    'table': (0.82, 0.74, 0.62, 1.0),
    'robot': (0.92, 0.92, 0.92, 1.0),
    'hand': (0.3, 0.3, 0.32, 1.0),
    'red': (0.85, 0.1, 0.1, 1.0),
    'blue': (0.1, 0.25, 0.9, 1.0),
    'pink': (0.95, 0.45, 0.75, 1.0),
    'zone': (0.15, 0.75, 0.2, 1.0),
    'button_base': (0.35, 0.35, 0.35, 1.0),
    'button_cap': (0.95, 0.85, 0.1, 1.0),
    'light_off': (0.2, 0.2, 0.2, 1.0),
    'light_on': (1.0, 1.0, 0.85, 1.0),
}

BLOCKS = ('red', 'blue', 'pink')
# Classes of the ``seg_static`` / ``seg_gripper`` frame keys (uint8 ids, ``TabletopEnv(segmentation=True)``):
# the simulator's object masks, which stand in for the object-level knowledge of a pretrained SAM
# (``python -m dreamvla_jax.teachers --sam segmentation``, which treats 0 = nothing and 1 = table as background).
SEGMENT_CLASSES = ('none', 'table', 'arm', 'hand', 'red', 'blue', 'pink', 'zone', 'button_base', 'button_cap',
                   'light')
SCENE_OBS_LABELS = (
    'zone_x', 'zone_y', 'button_depression', 'button_x', 'button_y', 'light',
    *(f'{c}_{a}' for c in BLOCKS for a in ('x', 'y', 'z', 'rx', 'ry', 'rz')),
)
SCENE_OBS_DIM = len(SCENE_OBS_LABELS)
ROBOT_OBS_DIM = 15

TASK_INSTRUCTIONS = {
    'lift_red_block': 'lift the red block',
    'push_blue_block_left': 'push the blue block to the left',
    'push_blue_block_right': 'push the blue block to the right',
    'place_red_block_in_area': 'put the red block in the green area',
    'stack_red_block_on_blue': 'stack the red block on top of the blue block',
    'press_button': 'press the yellow button to turn on the light',
}
TASK_NAMES = list(TASK_INSTRUCTIONS)

# Oracle thresholds (CALVIN's lift/push use 5 cm / 10 cm).
LIFT_HEIGHT = 0.05
PUSH_DISTANCE = 0.10
REST_TOL = 0.008             # a block "rests on the table" when its centre is within this of BLOCK_HALF


def _scene_index(label: str) -> int:
    return SCENE_OBS_LABELS.index(label)


def block_slice(color: str) -> slice:
    """Where ``color``'s xyz + euler live in ``scene_obs``."""
    i = _scene_index(f'{color}_x')
    return slice(i, i + 6)




def low_poly_panda_urdf() -> str:
    """Path of a copy of pybullet_data's panda.urdf that draws the arm with its collision meshes.

    The visual meshes have ~100k triangles, which TinyRenderer rasterises on the CPU for every camera: the
    collision meshes (~3.5k) render several times faster and still show the arm's shape. Written once into the
    temp folder (atomically, so parallel collector processes may race for it).
    """
    data = pybullet_data.getDataPath()
    text = open(os.path.join(data, 'franka_panda', 'panda.urdf')).read()
    collision = os.path.join(data, 'franka_panda', 'meshes', 'collision') + os.sep
    for prefix in ('package://meshes/visual/', 'package://meshes/collision/'):
        text = text.replace(prefix, collision)
    digest = hashlib.sha1(text.encode()).hexdigest()[:12]
    path = os.path.join(tempfile.gettempdir(), f'dreamvla_panda_lowpoly_{digest}.urdf')
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(dir=tempfile.gettempdir(), suffix='.urdf')
        with os.fdopen(fd, 'w') as f:
            f.write(text)
        os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------------------
# Start states.
# ----------------------------------------------------------------------------------------------------------

# Minimal centre distances between footprints (the green area is flat, so blocks may sit closer to it).
_MIN_DIST = {'block': 0.10, 'button': 0.10, 'zone': 0.09}
_SAMPLE_ORDER = ('blue', 'red', 'pink', 'button', 'zone')


def _kind(name):
    return name if name in ('button', 'zone') else 'block'


def _allowed(task, name, xy, placed) -> bool:
    for other, oxy in placed.items():
        d = max(_MIN_DIST[_kind(name)], _MIN_DIST[_kind(other)])
        if name == 'zone' and other == 'red' or name == 'red' and other == 'zone':
            d = 0.14  # the red block never starts in (or touching) the green area
        if np.linalg.norm(xy - oxy) < d:
            return False
    if task in ('push_blue_block_left', 'push_blue_block_right'):
        sign = -1.0 if task.endswith('left') else 1.0
        blue = xy if name == 'blue' else placed['blue']
        if name == 'blue':
            # Room to push: the block must stay on the sampled area.
            return OBJ_Y[0] <= blue[1] + sign * 0.18 <= OBJ_Y[1]
        if name != 'zone':
            # Nothing may stand where the closed gripper starts or along the 18 cm push path.
            lo_y, hi_y = sorted([blue[1] - sign * 0.07, blue[1] + sign * 0.18])
            # Margin = a turned block's half-diagonal (3.2 cm) + half a closed finger pair + slack.
            if abs(xy[0] - blue[0]) < 0.08 and lo_y - 0.055 < xy[1] < hi_y + 0.055:
                return False
    return True


def sample_scene_obs(task: str | None, seed: int | None) -> np.ndarray:
    """A start ``scene_obs`` where ``task`` is feasible and not yet done, deterministic in ``seed``.

    Objects are placed one by one (rejection sampling per object) so that no two footprints overlap and,
    for the push tasks, the path of the pushed block is clear for 18 cm; the red block never starts inside
    the green area. The light starts off and the button up.
    """
    rng = np.random.default_rng(seed)
    placed = {}
    while len(placed) < len(_SAMPLE_ORDER):
        placed = {}
        for name in _SAMPLE_ORDER:
            for _ in range(200):
                xy = np.array([rng.uniform(*OBJ_X), rng.uniform(*OBJ_Y)])
                if _allowed(task, name, xy, placed):
                    placed[name] = xy
                    break
            else:
                break  # start over: an unlucky early placement left no room
    red, blue, pink, button, zone = (placed[k] for k in ('red', 'blue', 'pink', 'button', 'zone'))
    scene = np.zeros(SCENE_OBS_DIM, np.float64)
    scene[_scene_index('button_x'):_scene_index('button_x') + 2] = button
    scene[_scene_index('zone_x'):_scene_index('zone_x') + 2] = zone
    for color, xy in (('red', red), ('blue', blue), ('pink', pink)):
        scene[block_slice(color)] = [xy[0], xy[1], BLOCK_HALF, 0.0, 0.0, rng.uniform(-0.3, 0.3)]
    return scene


# ----------------------------------------------------------------------------------------------------------
# The task oracle (calvin_env's ``Tasks`` interface).
# ----------------------------------------------------------------------------------------------------------

def _resting(block_info) -> bool:
    return bool(block_info['on_table'] and abs(block_info['pos'][2] - BLOCK_HALF) < REST_TOL)


def _stacked(info) -> bool:
    red, blue = info['objects']['red'], info['objects']['blue']
    dz = red['pos'][2] - blue['pos'][2]
    dxy = np.linalg.norm(red['pos'][:2] - blue['pos'][:2])
    return bool(abs(dz - 2 * BLOCK_HALF) < 0.01 and dxy < BLOCK_HALF and not red['contact_robot']
                and _resting(blue))


def _in_area(info) -> bool:
    red = info['objects']['red']
    d = np.abs(red['pos'][:2] - info['zone'])
    return bool(np.all(d < ZONE_HALF) and _resting(red) and not red['contact_robot'])


def task_success(task: str, start_info: dict, end_info: dict) -> bool:
    """Whether ``task`` was achieved between two ``get_info()`` snapshots (CALVIN oracles compare the two)."""
    if task.startswith('lift_'):
        color = task.split('_')[1]
        s, e = start_info['objects'][color], end_info['objects'][color]
        return bool(e['pos'][2] - s['pos'][2] > LIFT_HEIGHT and e['contact_robot'] and not e['on_table'])
    if task.startswith('push_'):
        color = task.split('_')[1]
        sign = -1.0 if task.endswith('left') else 1.0
        s, e = start_info['objects'][color], end_info['objects'][color]
        moved = sign * (e['pos'][1] - s['pos'][1])
        return bool(moved > PUSH_DISTANCE and _resting(e))
    if task == 'place_red_block_in_area':
        return _in_area(end_info) and not _in_area(start_info)
    if task == 'stack_red_block_on_blue':
        return _stacked(end_info) and not _stacked(start_info)
    if task == 'press_button':
        return bool(end_info['light'] and not start_info['light'])
    raise KeyError(f'unknown task {task!r}; known: {TASK_NAMES}')


class TabletopTasks:
    """calvin_env's ``Tasks`` for the tabletop: which tasks became true between two info snapshots."""

    def __init__(self, task_names=TASK_NAMES):
        self.task_names = list(task_names)

    def get_task_info(self, start_info: dict, end_info: dict) -> set[str]:
        return {t for t in self.task_names if task_success(t, start_info, end_info)}

    def get_task_info_for_set(self, start_info: dict, end_info: dict, task_filter) -> set[str]:
        return {t for t in task_filter if task_success(t, start_info, end_info)}


# ----------------------------------------------------------------------------------------------------------
# The environment.
# ----------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_stdout():
    """Silences C-level stdout (pybullet's connect prints ``argv[0]=``, which breaks progress bars)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # stdout replaced by an object without a file descriptor
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(devnull)
        os.close(saved)


@dataclass
class _Bodies:
    table: int
    robot: int
    blocks: dict
    zone: int
    button: int
    light: int


class TabletopEnv:
    """Franka Panda tabletop with six language-conditioned tasks; calvin_env's ``PlayTableSimEnv`` interface.

    Every ``reset`` rebuilds the pybullet world from scratch, so the same (robot_obs, scene_obs) followed by
    the same actions gives bit-identical observations no matter what ran before (pybullet keeps contact caches
    between steps that a state reset alone would not clear).
    """

    task_names = TASK_NAMES
    instructions = TASK_INSTRUCTIONS

    def __init__(self, render: bool = True, segmentation: bool = False):
        """Args:
          render: False skips both cameras (no 'rgb_obs'/'depth_obs' in obs), for fast rollouts.
          segmentation: also return each camera's object classes (``SEGMENT_CLASSES``) as
            ``obs['seg_obs'] = {'seg_static', 'seg_gripper'}`` (uint8 [H, W]; from the same render).
        """
        self.render = render
        self.segmentation = segmentation
        self._segment_lut: dict[int, int] = {}
        self.tasks = TabletopTasks()
        with _quiet_stdout():
            self._p = bullet_client.BulletClient(connection_mode=pybullet.DIRECT)
        self._p.setAdditionalSearchPath(pybullet_data.getDataPath())
        self._static_view = self._p.computeViewMatrix(STATIC_EYE, STATIC_TARGET, [0, 0, 1])
        self._static_proj = self._p.computeProjectionMatrixFOV(STATIC_FOV, 1.0, STATIC_NEAR, STATIC_FAR)
        self._gripper_proj = self._p.computeProjectionMatrixFOV(GRIPPER_FOV, 1.0, GRIPPER_NEAR, GRIPPER_FAR)
        self._robot_urdf = low_poly_panda_urdf()
        self._home_joints = None
        self._b: _Bodies | None = None
        self.current_task: str | None = None
        self.reset()

    # ---------------------------------------------------------------- world building

    def _build_world(self):
        p = self._p
        p.resetSimulation()
        p.setPhysicsEngineParameter(fixedTimeStep=1.0 / PHYSICS_HZ, numSolverIterations=50,
                                    deterministicOverlappingPairs=1)
        p.setGravity(0, 0, -9.81)
        table = p.createMultiBody(
            0, p.createCollisionShape(p.GEOM_BOX, halfExtents=[0.55, 0.5, 0.02]),
            p.createVisualShape(p.GEOM_BOX, halfExtents=[0.55, 0.5, 0.02], rgbaColor=COLORS['table']),
            basePosition=[0.35, 0.0, -0.02])
        robot = p.loadURDF(self._robot_urdf, [0, 0, 0], useFixedBase=True,
                           flags=p.URDF_ENABLE_CACHED_GRAPHICS_SHAPES)
        for link in range(-1, p.getNumJoints(robot)):
            color = COLORS['robot'] if link < HAND_LINK else COLORS['hand']
            p.changeVisualShape(robot, link, rgbaColor=color)
        for j in FINGER_JOINTS:
            p.changeDynamics(robot, j, lateralFriction=1.5, spinningFriction=0.003)
        blocks = {}
        for color in BLOCKS:
            blocks[color] = p.createMultiBody(
                BLOCK_MASS, p.createCollisionShape(p.GEOM_BOX, halfExtents=[BLOCK_HALF] * 3),
                p.createVisualShape(p.GEOM_BOX, halfExtents=[BLOCK_HALF] * 3, rgbaColor=COLORS[color]),
                basePosition=[0.5, 0, BLOCK_HALF])
            p.changeDynamics(blocks[color], -1, lateralFriction=0.8, spinningFriction=0.002)
        # The green area is drawn 1 mm into the table top: visible, but nothing can touch it.
        zone = p.createMultiBody(
            0, -1, p.createVisualShape(p.GEOM_BOX, halfExtents=[ZONE_HALF, ZONE_HALF, 0.0015],
                                       rgbaColor=COLORS['zone']),
            basePosition=[0.5, 0.0, -0.0005])
        # Button: fixed base + a cap on a prismatic joint held up by a weak position motor (the spring).
        cap_col = p.createCollisionShape(p.GEOM_CYLINDER, radius=BUTTON_CAP_RADIUS,
                                         height=2 * BUTTON_CAP_HALF_HEIGHT)
        cap_vis = p.createVisualShape(p.GEOM_CYLINDER, radius=BUTTON_CAP_RADIUS,
                                      length=2 * BUTTON_CAP_HALF_HEIGHT, rgbaColor=COLORS['button_cap'])
        button = p.createMultiBody(
            0, p.createCollisionShape(p.GEOM_BOX, halfExtents=BUTTON_BASE_HALF),
            p.createVisualShape(p.GEOM_BOX, halfExtents=BUTTON_BASE_HALF, rgbaColor=COLORS['button_base']),
            basePosition=[0.5, 0.0, BUTTON_BASE_HALF[2]],
            linkMasses=[0.05], linkCollisionShapeIndices=[cap_col], linkVisualShapeIndices=[cap_vis],
            linkPositions=[[0, 0, BUTTON_BASE_HALF[2] + BUTTON_CAP_HALF_HEIGHT]],
            linkOrientations=[[0, 0, 0, 1]], linkInertialFramePositions=[[0, 0, 0]],
            linkInertialFrameOrientations=[[0, 0, 0, 1]], linkParentIndices=[0],
            linkJointTypes=[p.JOINT_PRISMATIC], linkJointAxis=[[0, 0, 1]])
        p.changeDynamics(button, 0, jointLowerLimit=-BUTTON_TRAVEL, jointUpperLimit=0.0)
        p.setJointMotorControl2(button, 0, p.POSITION_CONTROL, targetPosition=0.0, force=4.0)
        light = p.createMultiBody(
            0, -1, p.createVisualShape(p.GEOM_SPHERE, radius=0.012, rgbaColor=COLORS['light_off']),
            basePosition=[0.5, 0.0, 0.0])
        self._b = _Bodies(table, robot, blocks, zone, button, light)
        # pybullet's segmentation value of (body, link) is body + ((link + 1) << 24).
        cls = SEGMENT_CLASSES.index
        lut = {table: cls('table'), zone: cls('zone'), button: cls('button_base'), light: cls('light'),
               button + (1 << 24): cls('button_cap')}
        for link in range(-1, p.getNumJoints(robot)):
            lut[robot + ((link + 1) << 24)] = cls('arm' if link < HAND_LINK else 'hand')
        for color, body in blocks.items():
            lut[body] = cls(color)
        self._segment_lut = lut
        if self._home_joints is None:
            self._home_joints = self._solve_home()

    def _solve_home(self):
        """Arm joints putting the TCP at HOME_TCP pointing down (iterated IK from the rest pose)."""
        p, robot = self._p, self._b.robot
        for j, q in zip(ARM_JOINTS, REST_JOINTS, strict=True):
            p.resetJointState(robot, j, q)
        for _ in range(50):
            q = self._ik(HOME_TCP, np.zeros(3))
            for j, qj in zip(ARM_JOINTS, q, strict=True):
                p.resetJointState(robot, j, qj)
        return np.array(q)

    # ---------------------------------------------------------------- kinematics

    def _grasp_pose_from_tcp(self, pos, euler):
        tcp_q = self._p.getQuaternionFromEuler(euler)
        inv = self._p.invertTransform([0, 0, 0], TCP_IN_GRASP)
        return self._p.multiplyTransforms(pos, tcp_q, inv[0], inv[1])

    def _ik(self, pos, euler):
        gpos, gorn = self._grasp_pose_from_tcp(pos, euler)
        q = self._p.calculateInverseKinematics(
            self._b.robot, GRASP_LINK, gpos, gorn, lowerLimits=JOINT_LO, upperLimits=JOINT_HI,
            jointRanges=[h - lo for lo, h in zip(JOINT_LO, JOINT_HI, strict=True)],
            restPoses=REST_JOINTS if self._home_joints is None else list(self._home_joints),
            maxNumIterations=30, residualThreshold=1e-5)
        return np.asarray(q[:7])

    def _tcp_pose(self):
        st = self._p.getLinkState(self._b.robot, GRASP_LINK, computeForwardKinematics=True)
        pos, orn = self._p.multiplyTransforms(st[4], st[5], [0, 0, 0], TCP_IN_GRASP)
        return np.array(pos), np.array(self._p.getEulerFromQuaternion(orn)), orn

    # ---------------------------------------------------------------- state

    def sample_task_state(self, task: str | None, seed: int | None):
        """``(robot_obs, scene_obs)``: a start where ``task`` is feasible, deterministic in ``seed``."""
        return self.home_robot_obs(), sample_scene_obs(task, seed)

    def home_robot_obs(self) -> np.ndarray:
        """The default start: TCP at HOME_TCP pointing down, gripper open."""
        obs = np.zeros(ROBOT_OBS_DIM, np.float64)
        obs[6] = 2 * FINGER_OPEN
        obs[7:14] = self._home_joints
        obs[14] = 1.0
        return obs

    def reset(self, robot_obs=None, scene_obs=None, seed=None, task=None):
        """Rebuild the world in the given state (or a seeded sample for ``task``) and return the observation.

        Args:
          robot_obs: ``[15]``; only joints [7:14], width [6] and gripper action [14] are used (calvin_env uses
            the first two). None = home pose, open gripper.
          scene_obs: ``[24]`` (``SCENE_OBS_LABELS``). None = ``sample_scene_obs(task, seed)``.
          seed: seeds the sampled scene (None = fresh entropy).
          task: the task the sampled scene must allow; None = any (a generic layout).
        """
        self._build_world()
        p, b = self._p, self._b
        self.current_task = task
        if robot_obs is None:
            robot_obs = self.home_robot_obs()
        if scene_obs is None:
            scene_obs = sample_scene_obs(task, seed)
        robot_obs = np.asarray(robot_obs, np.float64)
        scene_obs = np.asarray(scene_obs, np.float64)
        for j, q in zip(ARM_JOINTS, robot_obs[7:14], strict=True):
            p.resetJointState(b.robot, j, q)
        for j in FINGER_JOINTS:
            p.resetJointState(b.robot, j, robot_obs[6] / 2)
        self._gripper_action = 1.0 if robot_obs[14] >= 0 else -1.0
        pos, euler, _ = self._tcp_pose()
        self._target_pos, self._target_euler = pos.copy(), euler.copy()

        i = _scene_index
        for color in BLOCKS:
            s = scene_obs[block_slice(color)]
            p.resetBasePositionAndOrientation(b.blocks[color], s[:3], p.getQuaternionFromEuler(s[3:6]))
        zone_xy = scene_obs[i('zone_x'):i('zone_x') + 2]
        p.resetBasePositionAndOrientation(b.zone, [zone_xy[0], zone_xy[1], -0.0005], [0, 0, 0, 1])
        bxy = scene_obs[i('button_x'):i('button_x') + 2]
        p.resetBasePositionAndOrientation(b.button, [bxy[0], bxy[1], BUTTON_BASE_HALF[2]], [0, 0, 0, 1])
        p.resetJointState(b.button, 0, -float(scene_obs[i('button_depression')]))
        # The light sits on the far corner of the button base, where the gripper never needs to go.
        p.resetBasePositionAndOrientation(
            b.light, [bxy[0] + BUTTON_BASE_HALF[0], bxy[1] + BUTTON_BASE_HALF[1], 2 * BUTTON_BASE_HALF[2]],
            [0, 0, 0, 1])
        self._set_light(bool(scene_obs[i('light')] > 0.5))
        # Position motors hold the reset pose until the first action (the default motors would let it sag).
        self._apply_robot_targets([s[0] for s in p.getJointStates(b.robot, ARM_JOINTS)])
        self._steps = 0
        return self.get_obs()

    def _set_light(self, on: bool):
        self._light = on
        self._p.changeVisualShape(self._b.light, -1, rgbaColor=COLORS['light_on' if on else 'light_off'])

    def _apply_robot_targets(self, q):
        """Position targets for the 7 arm joints and both fingers (from the current gripper command)."""
        p, robot = self._p, self._b.robot
        p.setJointMotorControlArray(robot, ARM_JOINTS, p.POSITION_CONTROL, targetPositions=list(q),
                                    forces=ARM_FORCES, positionGains=[0.3] * 7)
        width = FINGER_OPEN if self._gripper_action > 0 else 0.0
        for j in FINGER_JOINTS:
            p.setJointMotorControl2(robot, j, p.POSITION_CONTROL, targetPosition=width, force=FINGER_FORCE,
                                    maxVelocity=0.3)

    # ---------------------------------------------------------------- stepping

    def step(self, action):
        """Applies one 7-d relative action (calvin_env semantics) for 1/30 s -> (obs, 0.0, False, info)."""
        a = binarize_gripper(action)  # a copy: the caller's array is never modified
        self._target_pos = np.clip(self._target_pos + a[:3] * MAX_REL_POS, TCP_BOUNDS_LO, TCP_BOUNDS_HI)
        self._target_euler = np.clip(wrap_to_pi(self._target_euler + a[3:6] * MAX_REL_ORN),
                                     -ORN_BOUNDS, ORN_BOUNDS)
        self._gripper_action = a[6]
        self._apply_robot_targets(self._ik(self._target_pos, self._target_euler))
        p, b = self._p, self._b
        for _ in range(ACTION_REPEAT):
            p.stepSimulation()
            # Latched: a press turns the light on for good (the cap springs back up).
            if not self._light and -p.getJointState(b.button, 0)[0] > BUTTON_PRESS_DEPTH:
                self._set_light(True)
        self._steps += 1
        return self.get_obs(), 0.0, False, self.get_info()

    # ---------------------------------------------------------------- observations

    def get_robot_obs(self) -> np.ndarray:
        p, robot = self._p, self._b.robot
        pos, euler, _ = self._tcp_pose()
        width = sum(s[0] for s in p.getJointStates(robot, FINGER_JOINTS))
        joints = [s[0] for s in p.getJointStates(robot, ARM_JOINTS)]
        return np.concatenate([pos, euler, [width], joints, [self._gripper_action]]).astype(np.float32)

    def get_scene_obs(self) -> np.ndarray:
        p, b = self._p, self._b
        scene = np.zeros(SCENE_OBS_DIM, np.float64)
        i = _scene_index
        scene[i('button_depression')] = max(0.0, -p.getJointState(b.button, 0)[0])
        scene[i('light')] = float(self._light)
        scene[i('button_x'):i('button_x') + 2] = p.getBasePositionAndOrientation(b.button)[0][:2]
        scene[i('zone_x'):i('zone_x') + 2] = p.getBasePositionAndOrientation(b.zone)[0][:2]
        for color in BLOCKS:
            pos, orn = p.getBasePositionAndOrientation(b.blocks[color])
            scene[block_slice(color)] = list(pos) + list(p.getEulerFromQuaternion(orn))
        return scene.astype(np.float32)

    def _render(self, view, proj, size, near, far):
        flags = (pybullet.ER_SEGMENTATION_MASK_OBJECT_AND_LINKINDEX if self.segmentation
                 else pybullet.ER_NO_SEGMENTATION_MASK)
        _, _, rgba, zbuf, seg = self._p.getCameraImage(
            size, size, view, proj, renderer=pybullet.ER_TINY_RENDERER, shadow=0, flags=flags)
        rgb = np.asarray(rgba, np.uint8).reshape(size, size, 4)[..., :3]
        zbuf = np.asarray(zbuf, np.float32).reshape(size, size)
        # OpenGL depth buffer -> metric distance along the optical axis (calvin_env's camera does the same).
        depth = far * near / (far - (far - near) * zbuf)
        classes = None
        if self.segmentation:
            values, inverse = np.unique(np.asarray(seg, np.int64).reshape(-1), return_inverse=True)
            ids = np.array([self._segment_lut.get(int(v), 0) for v in values], np.uint8)
            classes = ids[inverse].reshape(size, size)
        return np.ascontiguousarray(rgb), depth.astype(np.float32), classes

    def _gripper_view(self):
        """View matrix of the wrist camera, rigidly attached to the TCP frame."""
        pos, _, orn = self._tcp_pose()
        rot = np.array(self._p.getMatrixFromQuaternion(orn)).reshape(3, 3)
        forward = rot[:, 0] * GRIPPER_CAM_FORWARD
        eye = pos + rot[:, 2] * GRIPPER_CAM_UP + forward
        target = pos - rot[:, 2] * GRIPPER_CAM_LOOK + forward
        return self._p.computeViewMatrix(eye.tolist(), target.tolist(), rot[:, 0].tolist())

    def get_obs(self) -> dict:
        """calvin_env's ``get_obs()`` layout (see ``dreamvla_jax.envs.base``)."""
        obs = {'robot_obs': self.get_robot_obs(), 'scene_obs': self.get_scene_obs()}
        if self.render:
            rgb_s, depth_s, seg_s = self._render(self._static_view, self._static_proj, STATIC_SIZE,
                                                 STATIC_NEAR, STATIC_FAR)
            rgb_g, depth_g, seg_g = self._render(self._gripper_view(), self._gripper_proj, GRIPPER_SIZE,
                                                 GRIPPER_NEAR, GRIPPER_FAR)
            obs['rgb_obs'] = {'rgb_static': rgb_s, 'rgb_gripper': rgb_g}
            obs['depth_obs'] = {'depth_static': depth_s, 'depth_gripper': depth_g}
            if self.segmentation:
                obs['seg_obs'] = {'seg_static': seg_s, 'seg_gripper': seg_g}
        return obs

    def get_info(self) -> dict:
        """Everything the oracles read: object poses and contacts, light, green area, robot and scene obs."""
        p, b = self._p, self._b
        objects = {}
        for color, body in b.blocks.items():
            pos, orn = p.getBasePositionAndOrientation(body)
            objects[color] = {
                'pos': np.array(pos), 'euler': np.array(p.getEulerFromQuaternion(orn)),
                'contact_robot': len(p.getContactPoints(bodyA=body, bodyB=b.robot)) > 0,
                'on_table': len(p.getContactPoints(bodyA=body, bodyB=b.table)) > 0,
            }
        scene_obs = self.get_scene_obs()
        i = _scene_index
        return {
            'objects': objects,
            'light': bool(self._light),
            'button_depression': float(scene_obs[i('button_depression')]),
            'button': scene_obs[i('button_x'):i('button_x') + 2].astype(np.float64),
            'zone': scene_obs[i('zone_x'):i('zone_x') + 2].astype(np.float64),
            'robot_obs': self.get_robot_obs(),
            'scene_obs': scene_obs,
            'target_pos': self._target_pos.copy(),
            'steps': self._steps,
        }

    def close(self):
        if self._p is not None:
            self._p.disconnect()
            self._p = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_env(**kwargs) -> TabletopEnv:
    """The built-in benchmark environment (the factory ``eval`` uses when CALVIN is not installed)."""
    return TabletopEnv(**kwargs)


def benchmark_env(steps: int = 100, seed: int = 0) -> dict:
    """Env steps per second with both cameras rendered (random actions after a seeded reset).

    Returns ``{'hz': steps/s, 'step_ms': ms per step, 'reset_ms': ms per reset, 'steps': steps}``.
    """
    env = TabletopEnv()
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    env.reset(seed=seed)
    reset_s = time.perf_counter() - t0
    actions = rng.uniform(-1, 1, (steps, 7))
    t0 = time.perf_counter()
    for a in actions:
        env.step(a)
    dt = time.perf_counter() - t0
    env.close()
    return {'hz': steps / dt, 'step_ms': 1000 * dt / steps, 'reset_ms': 1000 * reset_s, 'steps': steps}
