/** JupyterLab plugin: Twinkle sidebar, status-bar item, and "Twinkle: Connect to server". */

import { ILabShell, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { Clipboard, Dialog, ICommandPalette, Notification, showDialog, showErrorMessage } from '@jupyterlab/apputils';
import { URLExt } from '@jupyterlab/coreutils';
import { INotebookTracker, NotebookActions } from '@jupyterlab/notebook';
import { ServerConnection } from '@jupyterlab/services';
import { IStatusBar } from '@jupyterlab/statusbar';
import { LabIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

import { TwinkleApi } from './api';
import { loadCheckpointCode } from './format';
import { Poller, TwinkleModel } from './model';
import { TwinklePanel } from './panel';
import { TwinkleStatus } from './status';
import type { ICheckpointInfo, IRunInfo } from './types';

const PLUGIN_ID = 'twinkle-jupyterlab:plugin';

export const twinkleIcon = new LabIcon({
  name: 'twinkle:star',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24" width="16"><path class="jp-icon3" fill="#616161" ' +
    'd="M12 2l2.2 6.8H21l-5.5 4 2.1 6.7L12 15.4l-5.6 4.1 2.1-6.7L3 8.8h6.8z"/></svg>'
});

namespace CommandIDs {
  export const connect = 'twinkle:connect';
  export const open = 'twinkle:open-panel';
  export const refresh = 'twinkle:refresh';
}

class ConnectForm extends Widget {
  private _url: HTMLInputElement;
  private _key: HTMLInputElement;

  constructor(currentUrl: string) {
    super();
    this.addClass('twk-connect-form');
    this._url = document.createElement('input');
    this._url.className = 'jp-mod-styled twk-input-url';
    this._url.placeholder = 'http://gpu-box:8000';
    this._url.value = currentUrl;
    this._key = document.createElement('input');
    this._key.className = 'jp-mod-styled twk-input-key';
    this._key.type = 'password';
    this._key.placeholder = 'API key';
    const l1 = document.createElement('label');
    l1.append('Server URL', this._url);
    const l2 = document.createElement('label');
    l2.append('API key (kept by the Jupyter server, never by the browser)', this._key);
    this.node.append(l1, l2);
  }

  getValue(): { url: string; apiKey: string } {
    return { url: this._url.value.trim(), apiKey: this._key.value.trim() };
  }
}

function activate(
  app: JupyterFrontEnd,
  palette: ICommandPalette | null,
  statusBar: IStatusBar | null,
  notebooks: INotebookTracker | null,
  labShell: ILabShell | null
): void {
  const settings = ServerConnection.makeSettings();
  const api = new TwinkleApi((path, init) =>
    ServerConnection.makeRequest(URLExt.join(settings.baseUrl, 'twinkle', path), init ?? {}, settings)
  );
  const model = new TwinkleModel(api);
  const poller = new Poller(model, () => document.hidden);
  document.addEventListener('visibilitychange', () => {
    if (!document.hidden) {
      poller.kick();
    }
  });

  const connect = async (): Promise<void> => {
    const form = new ConnectForm(model.overview?.connection?.url ?? '');
    const result = await showDialog({
      title: 'Connect to a Twinkle server',
      body: form,
      buttons: [Dialog.cancelButton(), Dialog.okButton({ label: 'Connect' })],
      focusNodeSelector: 'input'
    });
    if (!result.button.accept || !result.value) {
      return;
    }
    const { url, apiKey } = result.value;
    try {
      const reply = await model.connect(url, apiKey);
      if (reply.state === 'connected') {
        Notification.success(reply.message, { autoClose: 3000 });
      } else {
        Notification.error(reply.message, { autoClose: 8000 });
      }
    } catch (err) {
      await showErrorMessage('Twinkle: cannot connect', String((err as Error).message ?? err));
    }
    poller.kick();
  };

  const actions = {
    connect: () => void connect(),
    refresh: () => poller.kick(),
    copyPath: (ckpt: ICheckpointInfo) => {
      Clipboard.copyToSystem(ckpt.path);
      Notification.info(`Copied ${ckpt.path}`, { autoClose: 2000 });
    },
    insertLoadCell: (ckpt: ICheckpointInfo, run: IRunInfo) => {
      const nb = notebooks?.currentWidget;
      if (!nb) {
        void showErrorMessage('Twinkle', 'Open a notebook first to insert a cell.');
        return;
      }
      NotebookActions.insertBelow(nb.content);
      const cell = nb.content.activeCell;
      if (cell) {
        const backend = model.overview?.capabilities?.base_models.find(b => b.name === run.base_model)?.backend;
        cell.model.sharedModel.setSource(loadCheckpointCode(ckpt, run, backend));
      }
      app.shell.activateById(nb.id);
    },
    deleteCheckpoint: async (ckpt: ICheckpointInfo) => {
      const result = await showDialog({
        title: 'Delete checkpoint?',
        body: `Delete ${ckpt.path}? This cannot be undone.`,
        buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Delete' })]
      });
      if (!result.button.accept) {
        return;
      }
      try {
        await model.deleteCheckpoint(ckpt);
        Notification.success(`Deleted ${ckpt.name}`, { autoClose: 2000 });
      } catch (err) {
        await showErrorMessage('Twinkle: delete failed', String((err as Error).message ?? err));
      }
      poller.kick();
    }
  };

  const stop = async (kind: 'sessions' | 'runs', id: string): Promise<void> => {
    try {
      await api.stop(kind, id);
      Notification.info('Stop requested: the loop ends after the step in flight.', { autoClose: 3000 });
    } catch (err) {
      Notification.error(`Twinkle: stop failed: ${String((err as Error).message ?? err)}`, { autoClose: 8000 });
    }
    poller.kick();
  };

  const deleteRun = async (run: IRunInfo): Promise<void> => {
    const result = await showDialog({
      title: 'Delete training run?',
      body:
        `Delete ${run.name || run.run_id} (${run.run_id}, step ${run.step})? ` +
        (run.state === 'active' ? 'Its adapter is unloaded without a checkpoint. ' : '') +
        'Saved checkpoints stay. This cannot be undone.',
      buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Delete' })]
    });
    if (!result.button.accept) {
      return;
    }
    try {
      await api.deleteRun(run.run_id);
      Notification.success(`Deleted ${run.name || run.run_id}`, { autoClose: 2000 });
    } catch (err) {
      await showErrorMessage('Twinkle: delete failed', String((err as Error).message ?? err));
    }
    poller.kick();
  };

  // The LiveCurve widget's Stop button (class twk-stop-button, and twk-stop-session-<id> when the kernel knew its
  // session): the busy kernel cannot read the widget's click, so the click goes to the server from here.
  document.addEventListener(
    'click',
    ev => {
      const btn = (ev.target as Element | null)?.closest?.('.twk-stop-button');
      if (!btn) {
        return;
      }
      const cls = Array.from(btn.classList).find(c => c.startsWith('twk-stop-session-'));
      const sid = cls ? cls.slice('twk-stop-session-'.length) : (model.overview?.connection?.session_id ?? null);
      if (sid) {
        void stop('sessions', sid);
      } else {
        Notification.warning('Twinkle: no session known for this Stop button (not connected?)', { autoClose: 5000 });
      }
    },
    true
  );

  const panel = new TwinklePanel(model, {
    ...actions,
    deleteCheckpoint: (c: ICheckpointInfo) => void actions.deleteCheckpoint(c),
    stopRun: (run: IRunInfo) => void stop('runs', run.run_id),
    deleteRun: (run: IRunInfo) => void deleteRun(run)
  });
  panel.title.icon = twinkleIcon;
  app.shell.add(panel, 'left', { rank: 900 });

  app.commands.addCommand(CommandIDs.connect, {
    label: 'Twinkle: Connect to server',
    caption: 'Connect the Twinkle panel to a Twinkle server',
    execute: () => connect()
  });
  app.commands.addCommand(CommandIDs.open, {
    label: 'Twinkle: Open panel',
    execute: () => app.shell.activateById(panel.id)
  });
  app.commands.addCommand(CommandIDs.refresh, {
    label: 'Twinkle: Refresh',
    execute: () => poller.kick()
  });
  if (palette) {
    palette.addItem({ command: CommandIDs.connect, category: 'Twinkle' });
    palette.addItem({ command: CommandIDs.open, category: 'Twinkle' });
    palette.addItem({ command: CommandIDs.refresh, category: 'Twinkle' });
  }

  if (statusBar) {
    const item = new TwinkleStatus(model, () => app.shell.activateById(panel.id));
    statusBar.registerStatusItem('twinkle-jupyterlab:status', {
      item,
      align: 'left',
      rank: 50
    });
  }
  void labShell;
  poller.start();
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'Twinkle sidebar, status-bar item and connect command.',
  autoStart: true,
  requires: [],
  optional: [ICommandPalette, IStatusBar, INotebookTracker, ILabShell],
  activate
};

export default plugin;
