/** Status-bar item: connection state and number of active runs; a click opens the panel. */

import { Widget } from '@lumino/widgets';

import { statusText } from './format';
import type { TwinkleModel } from './model';

export class TwinkleStatus extends Widget {
  constructor(
    private readonly model: TwinkleModel,
    onClick: () => void
  ) {
    super();
    this.addClass('twk-status');
    this.node.title = 'Twinkle: click to open the panel';
    this.node.addEventListener('click', onClick);
    model.onChange(() => this.render());
    this.render();
  }

  render(): void {
    const state = this.model.state;
    this.node.dataset.state = state;
    this.node.textContent =
      this.model.localError !== null ? 'Twinkle: error' : statusText(this.model.overview, true);
  }
}
